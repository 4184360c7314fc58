"""GGUF files → a cached Hugging Face directory → IR.

transformers' GGUF loader dequantizes every tensor (≈25 s for a 135M model), so the
result is saved once as an HF-style directory (config, fp32 safetensors, tokenizer)
keyed by the file's SHA-256, and later loads are memory-mapped reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from tokopt.errors import InputFileError, ModelSourceError, SettingError, UnsupportedArchitectureError
from tokopt.frontends.cache import cache_dir
from tokopt.io_boundary import describe, reading

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_to_hf_directory(path: Path) -> Path:
    """The cached HF directory for GGUF ``path``, converting it on first use."""
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist")
    with reading(path, "GGUF file"):
        digest = file_digest(path)
    target = cache_dir() / "gguf" / f"{path.name}-{digest[:24]}"  # the name says which file it came from
    if (target / "config.json").exists():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelSourceError("reading .gguf files needs the gguf extra: pip install 'tokopt[gguf]'") from None
    check_gguf(path)
    log.info("dequantizing %s (once; cached in %s)", path.name, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    except OSError as exc:
        raise SettingError(f"cannot use the cache directory {target.parent} ({describe(exc)}); set $TOKOPT_CACHE_DIR "
                           "to a writable directory") from None
    try:
        _convert(path, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its result is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_gguf(path: Path) -> None:
    """Parse the header and check that every tensor's data lies inside the file (fast: memory-mapped).

    transformers' reader fails on a cut or corrupt file with ``struct.error``, numpy reshape
    errors or worse; checked here first, the user learns which file is broken and that it is.
    """
    from gguf import GGUFReader

    with reading(path, "GGUF file"):
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            end = int(tensor.data_offset) + int(tensor.n_bytes)
            if end > size:
                raise InputFileError(f"{path}: tensor {tensor.name} ends at byte {end:,} but the file has {size:,}; "
                                     "the file is truncated: re-download it")


def _convert(path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    progress, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # one line on failure, and nothing but the result on success
    hf_logging.set_verbosity_error()  # its load report is ours to judge (below), not to print
    # Its dequantization bar is a bare tqdm: shown on a terminal, kept out of logs (like every progress bar).
    quiet = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    try:
        with reading(path, "GGUF file"), quiet:
            try:
                model, loading = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True)
            except ValueError as exc:
                if "architecture" not in str(exc).lower():
                    raise
                raise UnsupportedArchitectureError(f"transformers cannot read {path.name}: {exc}") from None
            except RuntimeError as exc:
                if "mismatched" not in str(exc):
                    raise
                raise InputFileError(f"{path}: tensors whose shape the metadata contradicts; the file is corrupt: "
                                     "re-download it") from None
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    # transformers re-initialises, at random, tensors whose shape the metadata contradicts: refuse that model.
    wrong = [str(k[0] if isinstance(k, tuple) else k) for k in loading.get("mismatched_keys") or []]
    missing = [str(k) for k in loading.get("missing_keys") or [] if k != "lm_head.weight"]
    if wrong or missing:
        what = f"tensors whose shape the metadata contradicts: {', '.join(wrong[:3])}" if wrong else \
            f"tensors the metadata calls for are missing: {', '.join(missing[:3])}"
        raise InputFileError(f"{path}: {what}; the file is corrupt or not a complete model: re-download it")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]  # other tools dispatch on it
    config["tokopt_source"] = {"gguf_file": str(path)}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
