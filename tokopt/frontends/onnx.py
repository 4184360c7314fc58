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
  exactly as stored (:mod:`tokopt.frontends.onnx_genai`).

Anything else is refused with an error naming what was not recognised.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from tokopt.errors import ModelSourceError, UnsupportedArchitectureError
from tokopt.optimizer.corpus import has_tokenizer
from tokopt.optimizer.ir.graph import Graph, ModelMeta, Value
from tokopt.optimizer.ir.weights import LazyTensor, QuantizedWeight, pack_codes

log = logging.getLogger(__name__)

# where an HF module path starts inside an exporter's node or initializer name
_HF_ROOTS = ("model.", "transformer.", "lm_head")


def is_onnx_directory(path: Path) -> bool:
    """A directory holding an ONNX decoder and no HF weights (e.g. a tokopt onnxruntime artifact)."""
    return (path / "model.onnx").is_file() and not any(path.glob("*.safetensors")) \
        and not any(path.glob("pytorch_model*.bin"))


def load_onnx(path: str | Path) -> Graph:
    """Read an ONNX decoder (file, or directory holding ``model.onnx``) into a Graph."""
    import onnx

    path = Path(path)
    model_path = path / "model.onnx" if path.is_dir() else path
    if not model_path.is_file():
        raise ModelSourceError(f"{path}: no ONNX model found")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors are many; all mean "not an ONNX file"
        raise ModelSourceError(f"{model_path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if "tokopt.graph" in meta:
        return _from_tokopt(model, json.loads(meta["tokopt.graph"]), model_path)
    return _from_hf_export(model, model_path)


# -- initializers ------------------------------------------------------------------------------
class InitializerStore:
    """A model's initializers, read on demand (external data included); each wrapped once as a LazyTensor."""

    def __init__(self, model, model_path: Path) -> None:
        self.inits = {t.name: t for t in model.graph.initializer}
        self._base = str(model_path.parent)
        self._lazy: dict[str, LazyTensor] = {}

    def load(self, name: str) -> torch.Tensor:
        from onnx import numpy_helper

        return torch.from_numpy(numpy_helper.to_array(self.inits[name], base_dir=self._base).copy())

    def lazy(self, name: str) -> LazyTensor:
        if name not in self._lazy:
            from onnx import helper

            tensor = self.inits[name]
            dtype = str(helper.tensor_dtype_to_np_dtype(tensor.data_type))
            self._lazy[name] = LazyTensor(_shape_of(tensor), dtype, lambda: self.load(name))
        return self._lazy[name]


def _shape_of(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.dims)


# -- tokopt's own output --------------------------------------------------------------------------
def _from_tokopt(model, desc: dict[str, Any], model_path: Path) -> Graph:
    if desc.get("format") != 1:
        raise ModelSourceError(f"{model_path}: tokopt graph description format {desc.get('format')!r} is not "
                               "supported by this version (expected 1)")
    store = InitializerStore(model, model_path)
    meta = ModelMeta(**desc["meta"])
    if has_tokenizer(model_path.parent):
        meta.tokenizer_path = str(model_path.parent)
    meta.source = str(model_path)
    graph = Graph(meta)
    graph.history = [*desc["history"], "frontend:onnx:tokopt"]

    def stored(name: str) -> LazyTensor:
        if name not in store.inits:
            raise ModelSourceError(f"{model_path}: initializer {name!r} named by the graph description is missing")
        return store.lazy(name)

    for pname, entry in desc["params"].items():
        graph.params[pname] = _restore_param(entry, stored)
    for node in desc["nodes"]:
        inputs = [Value(n, s) for n, s in node["inputs"]]
        graph.add_node(node["op"], node["name"], inputs, node["attrs"], node["params"])
    graph.outputs = {k: Value(n, s) for k, (n, s) in desc["outputs"].items()}
    return graph


def _restore_param(entry: dict[str, Any], stored) -> Any:
    """Invert the storage the onnxruntime backend chose for one parameter."""
    shape = tuple(entry["param_shape"])
    if entry["kind"] == "nbits":
        return restore_nbits(entry, stored)
    src = stored(entry["init"])
    transform, cols = entry.get("transform", ""), entry.get("cols")

    def fn(t: torch.Tensor) -> torch.Tensor:
        if cols is not None:
            t = t[..., cols[0]:cols[1]]
        if transform == "T":
            t = t.t() if t.dim() == 2 else t.transpose(1, 2)
        elif transform == "stackedT":
            t = t.t().reshape(shape)
        elif transform:
            raise ModelSourceError(f"unknown parameter storage transform {transform!r}")
        return t.contiguous()

    return LazyTensor(shape, src.dtype, lambda: fn(src.materialize()))


def restore_nbits(entry: dict[str, Any], stored) -> QuantizedWeight:
    n, k = entry["shape"]
    bits, group = entry["bits"], entry["group_size"]
    rows = entry.get("rows") or [0, n]
    sl = slice(rows[0], rows[1])
    blob = stored(entry["B"]).materialize()[sl]  # (N, k_blocks, blob)
    k_blocks = blob.shape[1]
    if bits == 4:
        codes = torch.stack([blob & 0x0F, blob >> 4], dim=-1).reshape(n, k_blocks * group)
    else:
        codes = blob.reshape(n, k_blocks * group)
    codes = codes[:, :k]
    scale_dtype = getattr(torch, entry.get("scale_dtype", "float32"))
    scales = stored(entry["scales"]).materialize()[sl].reshape(n, k_blocks).to(scale_dtype)
    zeros = None
    if entry.get("zero_points"):
        z = stored(entry["zero_points"]).materialize()[sl]
        zeros = torch.stack([z & 0x0F, z >> 4], dim=-1).reshape(n, -1)[:, :k_blocks] if bits == 4 else z
        zeros = zeros.reshape(n, k_blocks).to(torch.uint8).contiguous()
    return QuantizedWeight(pack_codes(codes, bits), scales.contiguous(), zeros, bits, group, (n, k),
                           entry.get("method", "rtn"), dict(entry.get("extra") or {}))


# -- Hugging Face exports ---------------------------------------------------------------------------
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)$")  # GPT-2's Conv1D modules store (in, out) weights


def _hf_name(raw: str) -> str | None:
    """``m.model.layers.0.mlp.up_proj`` (or ``/m/model/layers.0/...``) → ``model.layers.0.mlp.up_proj``."""
    dotted = raw.strip("/").replace("/", ".")
    starts = [dotted.find(root) for root in _HF_ROOTS if dotted.find(root) >= 0
              and (dotted.find(root) == 0 or dotted[dotted.find(root) - 1] == ".")]
    return dotted[min(starts):] if starts else None


def _from_hf_export(model, model_path: Path) -> Graph:
    """Recover checkpoint tensors from a torch.onnx/optimum export and build the IR from config.json."""
    from safetensors.torch import save_file

    from tokopt.frontends.hf import load_hf_directory

    config_path = model_path.parent / "config.json"
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    contrib = sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})
    if contrib:
        from tokopt.frontends.onnx_genai import GENAI_CONFIG, is_genai_builder_output, load_genai_builder

        if is_genai_builder_output(model, model_path):
            return load_genai_builder(model, model_path)
        raise UnsupportedArchitectureError(
            f"{model_path}: ONNX decoders built from contrib ops ({', '.join(contrib)}) are recognised only as "
            f"onnxruntime-genai model builder output, with the {GENAI_CONFIG} it writes beside model.onnx; "
            "import the Hugging Face checkpoint it was built from, or a tokopt onnxruntime artifact")
    if "input_ids" not in inputs or "logits" not in outputs:
        raise UnsupportedArchitectureError(
            f"{model_path}: not a decoder export: expected an 'input_ids' input and a 'logits' output, found "
            f"inputs {sorted(inputs)} and outputs {sorted(outputs)}")
    if not config_path.is_file():
        raise ModelSourceError(f"{model_path}: a Hugging Face ONNX export needs its config.json beside it "
                               "(optimum writes one; copy the source model's config.json there)")
    config = json.loads(config_path.read_text())
    store = InitializerStore(model, model_path)
    inits, load = store.inits, store.load
    producers = {o: n for n in model.graph.node for o in n.output}
    tensors: dict[str, torch.Tensor] = {}
    unrecognised: list[str] = []

    def weight_source(name: str) -> tuple[str, bool] | None:
        """(initializer, transposed-in-graph) feeding a MatMul/Gemm input, through a Transpose if any."""
        if name in inits:
            return name, False
        node = producers.get(name)
        if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
            return node.input[0], True
        return None

    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        src = weight_source(node.input[1])
        if src is None:
            continue  # activations × activations (attention scores)
        module = _hf_name(node.name.rsplit("/", 1)[0]) if "/" in node.name else None
        if module is None:
            unrecognised.append(f"{node.op_type} {node.name!r} reading weight {src[0]!r}")
            continue
        w = load(src[0])
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        # the matmul computes x @ W' with W' = (in, out); a Linear weight is (out, in)
        w_in_out = w.t() if (src[1] or trans_b) else w
        conv1d = config.get("model_type") == "gpt2" and _CONV1D.search(module)
        tensors[f"{module}.weight"] = (w_in_out if conv1d else w_in_out.t()).contiguous()
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            tensors[f"{module}.bias"] = load(node.input[2])
    for node in model.graph.node:  # biases added after a MatMul: ".../q_proj/Add"
        if node.op_type == "Add" and "/" in node.name:
            module = _hf_name(node.name.rsplit("/", 1)[0])
            const = [i for i in node.input if i in inits]
            if module and const and f"{module}.weight" in tensors and f"{module}.bias" not in tensors:
                tensors[f"{module}.bias"] = load(const[0])
    for node in model.graph.node:  # norm weights: exporters deduplicate equal initializers, names get lost
        module = _hf_name(node.name.rsplit("/", 1)[0]) if "/" in node.name else None
        if module is None or not re.search(r"(norm|ln_\w+|ln_f)$", module):
            continue
        if node.op_type == "LayerNormalization":
            for role, idx in (("weight", 1), ("bias", 2)):
                if len(node.input) > idx and node.input[idx] in inits:
                    tensors.setdefault(f"{module}.{role}", load(node.input[idx]))
        elif node.op_type == "Mul":
            const = [i for i in node.input if i in inits and len(inits[i].dims) == 1 and inits[i].dims[0] > 1]
            if const:
                tensors.setdefault(f"{module}.weight", load(const[0]))
    for name in inits:  # parameters the exporter kept by name (embeddings, norms)
        hf = _hf_name(name)
        if hf is not None and hf not in tensors and hf.endswith(("weight", "bias")):
            tensors[hf] = load(name)
    if unrecognised:
        raise UnsupportedArchitectureError(
            f"{model_path}: cannot map these weight-reading nodes to checkpoint parameters (their names carry "
            f"no module path): {'; '.join(unrecognised[:4])}")
    if not tensors:
        raise UnsupportedArchitectureError(f"{model_path}: no parameter of a Hugging Face decoder was recognised")
    work = Path(tempfile.mkdtemp(prefix="tokopt-onnx-"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "model.safetensors"))
    (work / "config.json").write_text(json.dumps(config))
    for f in model_path.parent.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")):
            (work / f.name).write_bytes(f.read_bytes())
    try:
        graph = load_hf_directory(work)
    except ModelSourceError as exc:
        raise UnsupportedArchitectureError(
            f"{model_path}: the export's weights do not form a {config.get('model_type')} checkpoint: {exc}") from None
    graph.meta.source = str(model_path)
    graph.history = [h.replace("frontend:hf", "frontend:onnx:hf-export") for h in graph.history]
    log.info("imported %s: %d tensors recovered from the ONNX export", model_path, len(tensors))
    return graph
