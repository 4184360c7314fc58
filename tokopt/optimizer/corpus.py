"""The default offline text: docstrings of Python standard-library modules.

Every machine that runs tokopt has a Python installation, and its standard library
carries a few hundred thousand words of carefully written English prose about code.
Evaluation and calibration text are read from two *disjoint* lists of modules, so a
calibrated pass never sees the tokens it is judged on.  Docstrings are read with
:mod:`ast` (no module is imported or executed), in source order, so the text — and the
token ids — are identical on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import sys
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokopt.errors import CorpusError, ModelSourceError
from tokopt.io_boundary import reading

if TYPE_CHECKING:
    import torch

    from tokopt.optimizer.ir.graph import Graph

log = logging.getLogger(__name__)

#: Modules whose docstrings are the evaluation text (prose-heavy, pure Python, present since 3.8).
EVAL_MODULES: tuple[str, ...] = (
    "argparse", "collections", "functools", "textwrap", "pathlib", "subprocess", "inspect", "typing",
    "dataclasses", "enum", "shutil", "tarfile", "zipfile", "string", "json", "logging", "unittest.case",
    "contextlib", "abc", "fnmatch", "glob", "gettext", "locale", "random", "base64",
)

#: Modules whose docstrings are the calibration text.  Disjoint from :data:`EVAL_MODULES` (checked below).
CALIBRATION_MODULES: tuple[str, ...] = (
    "email.message", "http.client", "urllib.parse", "csv", "difflib", "heapq", "ftplib", "imaplib",
    "optparse", "pickle", "smtplib", "statistics", "tempfile", "threading", "calendar", "fractions",
    "configparser", "datetime", "ipaddress", "mailbox", "pprint", "queue", "sched", "shlex", "socket",
    "tokenize", "traceback", "weakref", "xml.dom.minidom", "zipimport", "bisect", "codecs", "copy",
)

assert not set(EVAL_MODULES) & set(CALIBRATION_MODULES), "evaluation and calibration modules must be disjoint"


@dataclass(frozen=True)
class TextSource:
    """A body of text and where it came from (recorded in the report)."""

    name: str
    text: str
    modules: tuple[str, ...] = field(default=())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        info = {"name": self.name, "chars": len(self.text), "sha256": self.sha256}
        if self.modules:
            info["modules"] = list(self.modules)
            info["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"
        return info


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_file(name: str) -> Path | None:
    """The source file of a standard-library module (``a.b`` → ``a/b.py`` or ``a/b/__init__.py``)."""
    base = stdlib_dir().joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_docstrings(path: Path) -> list[str]:
    """The module's, classes' and functions' docstrings, in source order, cleaned."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.split()) >= 3:  # skip one-word stubs, they are noise
                out.append(doc)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return out


@lru_cache(maxsize=8)
def stdlib_text(modules: tuple[str, ...], name: str) -> TextSource:
    """Docstrings of ``modules`` joined in order (memoized: parsing the sources takes a second or two)."""
    parts: list[str] = []
    used: list[str] = []
    for module in modules:
        path = module_file(module)
        if path is None:  # a trimmed Python (some distributions strip modules): use what is there
            log.debug("standard-library module %s not found; skipped", module)
            continue
        docs = module_docstrings(path)
        if docs:
            parts.append("\n\n".join(docs))
            used.append(module)
    if not parts:
        raise CorpusError(f"no standard-library sources found under {stdlib_dir()}; pass --eval-text/--calib-text FILE")
    return TextSource(name, "\n\n".join(parts), tuple(used))


def default_eval_text() -> TextSource:
    return stdlib_text(EVAL_MODULES, "stdlib-docstrings:eval")


def default_calibration_text() -> TextSource:
    return stdlib_text(CALIBRATION_MODULES, "stdlib-docstrings:calibration")


def file_text(path: str | Path) -> TextSource:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read text file {p}: {exc}") from None
    if not text.strip():
        raise CorpusError(f"text file {p} is empty")
    return TextSource(str(p), text)


def resolve_texts(eval_text: str | Path | None, calib_text: str | Path | None) -> tuple[TextSource, TextSource]:
    """Evaluation and calibration text (files or the stdlib defaults), refusing identical ones."""
    ev = file_text(eval_text) if eval_text else default_eval_text()
    cal = file_text(calib_text) if calib_text else default_calibration_text()
    if ev.sha256 == cal.sha256:
        raise CorpusError("evaluation and calibration text are the same; give different files so a calibrated "
                          "pass is not judged on the text it was fitted to")
    return ev, cal


TOKENIZER_DEFINING_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: str | Path | None) -> bool:
    """Whether ``directory`` holds a loadable tokenizer's own files (a generation_config.json alone is not one)."""
    return bool(directory) and any((Path(directory) / f).is_file() for f in TOKENIZER_DEFINING_FILES)


def tokenizer_for(graph: Graph):
    """The model's tokenizer, or None when it carries none (tiny test models built from a config)."""
    if not has_tokenizer(graph.meta.tokenizer_path):
        return None
    return load_tokenizer(graph)


def load_tokenizer(graph: Graph):
    path = graph.meta.tokenizer_path
    if not path:
        raise ModelSourceError(f"{graph.meta.source} carries no tokenizer; pass token ids instead")
    return _tokenizer_at(str(path))


@lru_cache(maxsize=4)
def _tokenizer_at(path: str):
    """One tokenizer per directory and process (loading one takes ~0.4 s; a job asks for it several times)."""
    from transformers import AutoTokenizer

    with reading(path, "tokenizer (tokenizer.json, tokenizer_config.json, …)",
                 "restore the tokenizer files from the model's source"):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def tokenize(text: TextSource, tokenizer, vocab_size: int) -> torch.Tensor:
    """Token ids (1-D) of ``text`` with ``tokenizer``, without special tokens.

    Without a tokenizer, UTF-8 bytes folded into the vocabulary stand in: deterministic,
    and enough to compare the stages of one model with each other.
    """
    import torch

    if tokenizer is None:
        log.warning("no tokenizer: evaluating on UTF-8 bytes modulo the vocabulary (%d)", vocab_size)
        data = torch.frombuffer(bytearray(text.text.encode("utf-8")), dtype=torch.uint8).long()
        return data % vocab_size
    ids = _tokenized(tokenizer, text)
    if text.text.strip() and ids.numel() == 0:
        raise CorpusError(f"the tokenizer in {tokenizer.name_or_path} turns the {len(text.text):,} characters of "
                          f"{text.name} into no tokens: its vocabulary cannot spell them (damaged, or made for "
                          "another language); give --eval-text/--calib-text it can encode, or repair the tokenizer")
    return ids


_TOKENIZED: dict[tuple[int, str], tuple[Any, torch.Tensor]] = {}  # the tokenizer is kept: its id stays its own


def _tokenized(tokenizer, text: TextSource) -> torch.Tensor:
    """``tokenize_with`` memoized per tokenizer object and text (a job tokenizes its calibration text for the
    passes and again for the parity check: ~0.8 s each on the default text); a copy, so callers may write."""
    key = (id(tokenizer), text.sha256)
    if key not in _TOKENIZED:
        if len(_TOKENIZED) >= 8:
            _TOKENIZED.clear()
        _TOKENIZED[key] = (tokenizer, tokenize_with(tokenizer, text.text))
    return _TOKENIZED[key][1].clone()


def tokenize_with(tokenizer, text: str) -> torch.Tensor:
    import torch
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than the model's maximum": we chunk it ourselves
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def fixed_batches(ids: torch.Tensor, sequences: int, seq_len: int, what: str, offset: int = 0) -> torch.Tensor:
    """The first ``sequences`` × ``seq_len`` tokens after ``offset`` as a (sequences, seq_len) tensor."""
    need = offset + sequences * seq_len
    if ids.numel() < need:
        raise CorpusError(f"{what} has {ids.numel():,} tokens, {need:,} are needed "
                          f"({sequences} × {seq_len}{f' after {offset:,}' if offset else ''}); "
                          "give a longer text file or fewer/shorter sequences")
    return ids[offset:need].reshape(sequences, seq_len).clone()


__all__ = [
    "EVAL_MODULES", "CALIBRATION_MODULES", "CorpusError", "TextSource", "default_eval_text",
    "default_calibration_text", "file_text", "resolve_texts", "tokenize", "tokenizer_for", "tokenize_with",
    "fixed_batches", "module_docstrings", "stdlib_text",
]
