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
import fnmatch
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokopt.errors import ModelSourceError, OutputExistsError, OutputLocationError
from tokopt.interrupts import deferred_interrupts, raise_if_interrupted
from tokopt.io_boundary import make_parents, output_failure, probe_output_location, reading, remove_empty

if TYPE_CHECKING:
    from tokopt.backends.base import Session
    from tokopt.optimizer.ir.graph import Graph

log = logging.getLogger(__name__)

MANIFEST_FILE = "tokopt_artifact.json"
ARTIFACT_FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
# What a Hugging Face tokenizer may consist of (config.json helps AutoTokenizer pick the class).
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.model", "chat_template*", "generation_config.json", "config.json", "preprocessor_config.json")


def _tokopt_version() -> str:
    from tokopt.version import __version__

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
    with reading(file, "artifact manifest", "re-create the artifact with tokopt optimize"):
        manifest = json.loads(file.read_text(encoding="utf-8"))
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
    backend = get_backend(manifest["backend"])
    with reading(path, f"{manifest['backend']} artifact", "re-create it with tokopt optimize"):
        return backend.load(Path(path), **options)


def check_output(out: Path, force: bool, empty_ok: bool = False) -> None:
    """Refuse an existing ``out`` (unless ``force``, or ``empty_ok`` and it is an empty directory), and a location
    where it could not be created, before any work."""
    if out.exists() or out.is_symlink():
        if empty_ok and out.is_dir() and not any(out.iterdir()):
            return
        if not force:
            raise OutputExistsError(f"{out} exists; choose another -o/--out or pass --force to replace it")
        if not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory; remove it or choose another -o/--out")
    probe_output_location(out)


@contextlib.contextmanager
def atomic_directory(out: str | Path, force: bool = False, empty_ok: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; on success it becomes ``out``, on failure it is deleted.

    A build system reading ``out`` must never see half a result: the temporary directory lives
    next to ``out`` (same filesystem, so the final rename is atomic).  An existing ``out`` is
    refused (see :func:`check_output`); with ``force`` it is replaced only once the new one is complete.
    Parents it had to create go too when it fails, and a failure to write (no space, read-only,
    permissions) is an :class:`~tokopt.errors.OutputLocationError`.  Two runs finishing on the
    same ``out`` take turns (a lock on its parent): one wins whole, the other fails cleanly.
    """
    out = Path(out)
    check_output(out, force, empty_ok)
    created = make_parents(out.parent)  # like `mkdir -p`; OUT itself appears only when complete
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        remove_empty(created)
        raise output_failure(exc, out) or OutputLocationError(
            f"cannot create a directory beside {out} ({exc}); choose another -o") from None
    try:
        yield tmp
        raise_if_interrupted()  # a signal a library swallowed on its way up: an interrupted run publishes nothing
        # the swap through a trash directory must not be cut in half (an interrupt there left the trash behind):
        # a signal arriving inside is raised once it is done, as if it had come just after
        with _parent_locked(out), deferred_interrupts():
            _commit(tmp, out, force, empty_ok)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        failure = output_failure(exc, out) if isinstance(exc, Exception) else None
        if failure is not None and failure is not exc:
            raise failure from exc
        raise


@contextlib.contextmanager
def _parent_locked(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``out``'s parent directory (nothing is created for it), where supported."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename's own atomicity is all there is
        yield
        return
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _commit(tmp: Path, out: Path, force: bool, empty_ok: bool) -> None:
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an output directory is normally shared
    if out.exists():
        if not force and not (empty_ok and out.is_dir() and not any(out.iterdir())):
            raise OutputExistsError(f"{out} was written by another run while this one worked; this run's result was "
                                    "discarded (choose another -o/--out, or --force to replace it)")
        check_output(out, force, empty_ok)
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(trash / out.name, out)  # put the old one back
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    log.info("wrote %s", out)


METADATA_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".html", ".txt")


def weight_files(path: str | Path) -> list[Path]:
    """The artifact's files that hold the model (weights, graph, engine): all it lists but tokenizer and metadata
    (a chat template or a SentencePiece ``.model`` is the tokenizer's, not weight bytes)."""
    manifest = read_manifest(path)
    return [Path(path) / f for f in manifest["files"]
            if not f.startswith(f"{TOKENIZER_DIR}/") and not f.endswith(METADATA_SUFFIXES)
            and not any(fnmatch.fnmatch(Path(f).name, pattern) for pattern in TOKENIZER_PATTERNS)]


def weight_file_bytes(path: str | Path) -> int:
    """Bytes of :func:`weight_files` on disk (their sizes, what ``du --apparent-size --bytes`` adds up)."""
    return sum(f.stat().st_size for f in weight_files(path))


def copy_tokenizer(graph: Graph, dest: Path, skip: Collection[str] = ()) -> list[str]:
    """Copy the model's tokenizer files into ``dest``; returns the names copied (empty: it carries none).

    ``skip`` names files the caller writes itself (the onnxruntime artifact's own ``config.json``).
    """
    src = graph.meta.tokenizer_path
    if not src or not Path(src).is_dir():
        log.info("model %s carries no tokenizer directory; the artifact will have none", graph.meta.source)
        return []
    files = sorted({p for pattern in TOKENIZER_PATTERNS for p in Path(src).glob(pattern)
                    if p.is_file() and p.name not in skip})
    if not any(p.name.startswith("tokenizer") or p.suffix == ".model" or p.name.startswith("vocab") for p in files):
        log.info("%s holds no tokenizer files; the artifact will have none", src)
        return []
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy2(p, dest / p.name)
    return [p.name for p in files]


__all__ = ["MANIFEST_FILE", "ARTIFACT_FORMAT_VERSION", "TOKENIZER_DIR", "check_output", "write_manifest",
           "read_manifest", "is_artifact", "load_artifact", "atomic_directory", "copy_tokenizer", "model_summary",
           "weight_files", "weight_file_bytes"]
