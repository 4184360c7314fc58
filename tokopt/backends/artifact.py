"""The artifact convention every backend follows: a directory with ``tokopt_artifact.json``.

``tokopt_artifact.json`` names the backend that wrote the directory, so ``tokopt eval
ARTIFACT`` / ``tokopt bench ARTIFACT`` (and :func:`load_artifact`) can hand it back to
the right backend without being told.  It always has::

    {"backend": "torch", "tokopt_version": "0.1.0", "format_version": 1,
     "files": [...], "tokenizer": "tokenizer" | null, "model": {...}, ...backend keys}

Artifacts are written atomically (:func:`atomic_directory`): into a hidden sibling
directory that is renamed into place only when complete, so a crash never leaves a
half-written artifact behind and an existing directory is never silently replaced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokopt.optimizer.errors import ModelSourceError, TokoptError

if TYPE_CHECKING:
    from tokopt.backends.base import Session
    from tokopt.optimizer.graph import Graph

log = logging.getLogger(__name__)

MANIFEST_FILE = "tokopt_artifact.json"
ARTIFACT_FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
# What a Hugging Face tokenizer may consist of (config.json helps AutoTokenizer pick the class).
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.model", "chat_template*", "generation_config.json", "config.json", "preprocessor_config.json")


class OutputExistsError(TokoptError):
    """The output directory exists and is not empty; tokopt never overwrites it silently."""


def _tokopt_version() -> str:
    from tokopt import __version__

    return __version__


def model_summary(graph: Graph) -> dict[str, Any]:
    m = graph.meta
    return {"architecture": m.architecture, "model_type": m.model_type, "source": m.source,
            "vocab_size": m.vocab_size, "num_layers": m.num_layers, "history": list(graph.history)}


def write_manifest(directory: Path, backend: str, files: list[str], graph: Graph | None = None,
                   tokenizer: str | None = None, **extra: Any) -> dict[str, Any]:
    """Write ``tokopt_artifact.json`` into ``directory`` and return its content."""
    manifest: dict[str, Any] = {
        "backend": backend,
        "tokopt_version": _tokopt_version(),
        "format_version": ARTIFACT_FORMAT_VERSION,
        "files": sorted(set(files) | {MANIFEST_FILE}),
        "tokenizer": tokenizer,
        "model": model_summary(graph) if graph is not None else None,
        **extra,
    }
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the artifact at ``path`` (a clear error when it is not one)."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise ModelSourceError(f"{path} is not a tokopt artifact (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or "backend" not in manifest:
        raise ModelSourceError(f"{file} does not name the backend that wrote it")
    if manifest.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ModelSourceError(f"{file}: artifact format version {manifest.get('format_version')!r} is not "
                               f"supported (this tokopt reads version {ARTIFACT_FORMAT_VERSION})")
    return manifest


def load_artifact(path: str | Path, **options: Any) -> Session:
    """Load the artifact at ``path`` with the backend that wrote it."""
    from tokopt.backends.registry import get_backend

    manifest = read_manifest(path)
    return get_backend(manifest["backend"]).load(Path(path), **options)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds.

    ``out_dir`` must not exist, or be an empty directory; otherwise :class:`OutputExistsError`.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists and is not empty; choose a new output directory or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer(graph: Graph, directory: Path) -> str | None:
    """Copy the model's tokenizer files into ``directory/tokenizer``; returns that name or None."""
    src = graph.meta.tokenizer_path
    if not src or not Path(src).is_dir():
        log.info("model %s carries no tokenizer directory; the artifact will have none", graph.meta.source)
        return None
    files = sorted({p for pattern in TOKENIZER_PATTERNS for p in Path(src).glob(pattern) if p.is_file()})
    if not any(p.name.startswith("tokenizer") or p.suffix == ".model" or p.name.startswith("vocab") for p in files):
        log.info("%s holds no tokenizer files; the artifact will have none", src)
        return None
    dest = Path(directory) / TOKENIZER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy2(p, dest / p.name)
    return TOKENIZER_DIR


__all__ = ["MANIFEST_FILE", "ARTIFACT_FORMAT_VERSION", "TOKENIZER_DIR", "OutputExistsError", "write_manifest",
           "read_manifest", "is_artifact", "load_artifact", "atomic_directory", "copy_tokenizer", "model_summary"]
