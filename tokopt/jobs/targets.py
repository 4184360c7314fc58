"""Opening what a user names for eval/bench: a model, a tokopt artifact, or another tool's onnxruntime-genai
directory — each as a session with its tokenizer and vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokopt.errors import UsageError
from tokopt.jobs.common import load_model
from tokopt.optimizer.corpus import has_tokenizer, tokenizer_for
from tokopt.optimizer.ir.graph import Graph


@dataclass
class Target:
    """A model or an artifact, opened for running: a forward, its tokenizer and vocabulary.

    A model runs on the reference executor with fused kernels (``exact=False``), as ``optimize`` measures
    quality: the same figures, and a bench of the model is the executor at its fastest."""

    label: str
    session: Any
    tokenizer: Any
    vocab_size: int
    graph: Graph | None
    artifact: dict[str, Any] | None = None


def open_target(target: str | Path | Graph, load_options: dict[str, Any] | None = None) -> Target:
    from tokopt.backends.artifact import is_artifact, load_artifact, read_manifest
    from tokopt.optimizer.interpret import ReferenceExecutor

    if isinstance(target, Graph):
        return Target(target.meta.source or "graph", ReferenceExecutor(target, exact=False),
                      tokenizer_for(target),
                       target.meta.vocab_size, target)
    if is_artifact(target):
        from tokopt.measure.speed import artifact_vocab_size

        manifest = read_manifest(target)
        session = load_artifact(target, **(load_options or {}))
        tokenizer = _directory_tokenizer(Path(target) / manifest["tokenizer"]) if manifest.get("tokenizer") else None
        return Target(str(target), session, tokenizer, artifact_vocab_size(manifest), None, manifest)
    if (genai := genai_directory(target)) is not None:
        from tokopt.backends.onnxruntime.session import OnnxRuntimeSession

        session = OnnxRuntimeSession(Path(target) / "model.onnx", **(load_options or {}))
        tokenizer = _directory_tokenizer(Path(target)) if has_tokenizer(target) else None
        return Target(str(target), session, tokenizer, genai["vocab_size"], None)
    graph = load_model(target)
    return Target(str(target), ReferenceExecutor(graph, exact=False), tokenizer_for(graph),
                  graph.meta.vocab_size, graph)


def genai_directory(target: str | Path) -> dict[str, Any] | None:
    """The ``model`` section of another tool's onnxruntime-genai directory (e.g. its model builder's output),
    which runs as is on onnxruntime; None for anything else."""
    import json

    path = Path(target)
    config = path / "genai_config.json"
    if not (path.is_dir() and config.is_file() and (path / "model.onnx").is_file()):
        return None
    try:
        model = json.loads(config.read_text())["model"]
        return {**model, "vocab_size": int(model["vocab_size"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{config} is not an onnxruntime-genai config with model.vocab_size ({exc})") from None


def _directory_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    from tokopt.errors import CorpusError

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CorpusError(f"cannot load the tokenizer in {path}: {exc}") from None
