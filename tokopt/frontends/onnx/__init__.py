"""ONNX decoder models → IR, so passes apply to models users hand us as ``.onnx``.

Three layouts are recognised:

- **tokopt's own output** (the onnxruntime backend's ``model.onnx``): the file carries the
  IR (``tokopt.graph`` metadata) and every parameter's storage, so the graph comes back
  exactly — the same nodes, attributes and (bit-identical, quantized or not) weights.
- **Hugging Face exports with past key values** (``torch.onnx.export``/optimum): the
  exporters keep each module's path in node names (``/model/layers.0/self_attn/q_proj/MatMul``)
  and parameter names on the rest, so the weights are recovered under their checkpoint
  names and the architecture's own frontend builder (from the ``config.json`` beside the
  file) rebuilds the IR — the robust route, no pattern matching of attention math.
- **onnxruntime-genai model builder output** (``model.onnx`` of contrib ops + ``genai_config.json``,
  no ``config.json``) of llama-family decoders, fp32 or int4 ``MatMulNBits``: the same route,
  with the config rebuilt from ``genai_config.json`` and the graph and int4 weights kept
  exactly as stored (:mod:`tokopt.frontends.onnx.genai_builder`).

Anything else is refused with an error naming what was not recognised.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tokopt.errors import InputFileError, ModelSourceError
from tokopt.frontends.onnx.hf_export import from_hf_export
from tokopt.frontends.onnx.store import check_initializers
from tokopt.frontends.onnx.tokopt_artifact import from_tokopt
from tokopt.io_boundary import describe, reading
from tokopt.optimizer.ir.graph import Graph

log = logging.getLogger(__name__)


def is_onnx_directory(path: Path) -> bool:
    """A directory holding an ONNX decoder and no HF weights (e.g. a tokopt onnxruntime artifact)."""
    return (path / "model.onnx").is_file() and not any(path.glob("*.safetensors")) \
        and not any(path.glob("pytorch_model*.bin"))


def load_onnx(path: str | Path) -> Graph:
    """Read an ONNX decoder (file, or directory holding ``model.onnx``) into a Graph.

    Every initializer is checked against its bytes first — embedded or in external-data files,
    which must exist, stay inside the model's directory and be long enough — because the tensors
    are read lazily: a short file would otherwise fail deep inside a pass.  A protobuf cut at a
    field boundary parses as a smaller, valid message, so whatever the importers then trip over
    is reported as this file's problem too.
    """
    import onnx

    path = Path(path)
    model_path = path / "model.onnx" if path.is_dir() else path
    if not model_path.is_file():
        raise ModelSourceError(f"{path}: no ONNX model found")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors are many; all mean "not an ONNX file"
        raise InputFileError(f"{model_path} is not a readable ONNX model ({describe(exc)}); it may be truncated or "
                             "corrupt: re-export it") from None
    check_initializers(model, model_path)
    with reading(model_path, "ONNX model", "re-export it"):
        meta = {p.key: p.value for p in model.metadata_props}
        if "tokopt.graph" in meta:
            return from_tokopt(model, json.loads(meta["tokopt.graph"]), model_path)
        return from_hf_export(model, model_path)
