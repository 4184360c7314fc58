"""GGUF files → a cached Hugging Face directory → IR.

transformers' GGUF loader dequantizes every tensor (≈25 s for a 135M model), so the
result is saved once as an HF-style directory (config, fp32 safetensors, tokenizer)
keyed by the file's SHA-256, and later loads are memory-mapped reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from tokopt.errors import ModelSourceError, UnsupportedArchitectureError
from tokopt.frontends.cache import cache_dir

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
    target = cache_dir() / "gguf" / file_digest(path)[:24]
    if (target / "config.json").exists():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelSourceError("reading .gguf files needs the gguf extra: pip install 'tokopt[gguf]'") from None
    log.info("dequantizing %s (once; cached in %s)", path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
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


def _convert(path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ValueError as exc:
        raise UnsupportedArchitectureError(f"transformers cannot read {path.name}: {exc}") from None
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["tokopt_source"] = {"gguf_file": str(path)}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
