"""Hugging Face checkpoints → IR, one builder module per architecture.

``ARCHITECTURES`` maps a config's ``model_type`` to its builder; plugins add more with
:func:`register_architecture`.  Only the config and safetensors are read — no model
code from the checkpoint ever runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tokopt.errors import InputFileError, ModelSourceError, UnsupportedArchitectureError
from tokopt.frontends.checkpoint import read_checkpoint
from tokopt.frontends.hf import (
    gemma,
    gpt2,
    gpt_oss,
    granite,
    llama,
    mistral,
    mixtral,
    olmo2,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    smollm3,
)
from tokopt.frontends.hf.builder import HFSource
from tokopt.frontends.hf.plugin_builder import PluginBuilder
from tokopt.io_boundary import reading
from tokopt.optimizer.ir.graph import Graph
from tokopt.plugins import plugin_names, reserve_builtin_names

Builder = Callable[[HFSource], Graph]

ARCHITECTURES: dict[str, Builder] = {
    "llama": llama.build,
    "mistral": mistral.build,
    "qwen2": qwen2.build,
    "qwen3": qwen3.build,
    "gpt2": gpt2.build,
    "mixtral": mixtral.build,
    "qwen2_moe": qwen2_moe.build,
    "qwen3_moe": qwen3_moe.build,
    "gemma2": gemma.build_gemma2,
    "gemma3_text": gemma.build_gemma3,
    "phi3": phi3.build,
    "smollm3": smollm3.build,
    "gpt_oss": gpt_oss.build,
    "olmo2": olmo2.build,
    "granite": granite.build,
}
reserve_builtin_names("frontend", ARCHITECTURES)


def register_architecture(model_type: str, builder: Builder) -> None:
    ARCHITECTURES[model_type] = builder


def install_plugin_architectures() -> None:
    """Plugin architectures join the table; each builder is imported when its checkpoint is loaded."""
    for model_type in plugin_names("frontend"):
        ARCHITECTURES.setdefault(model_type, PluginBuilder(model_type))


def supported_architectures() -> list[str]:
    install_plugin_architectures()
    return sorted(ARCHITECTURES)


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise ModelSourceError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    with reading(path, "config.json", "restore it from the model's source"):
        config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise InputFileError(f"{path} does not hold a JSON object; restore it from the model's source")
    return config


def load_hf_directory(model_dir: Path) -> Graph:
    """Build the IR for the checkpoint in ``model_dir``.

    A config whose values contradict each other or the tensors (a head count of zero, a shape
    that does not divide) fails in transformers or in the builder with whatever type they raise;
    it is the user's checkpoint, so it becomes one line naming it (``-vv`` shows the traceback).
    """
    config_dict = read_config(model_dir)
    model_type = config_dict.get("model_type")
    if model_type not in ARCHITECTURES:
        install_plugin_architectures()
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(supported_architectures())}")
    from transformers import AutoConfig

    with reading(model_dir / "config.json", "config.json", "restore it from the model's source"):
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    src = HFSource(model_dir, config, config_dict, read_checkpoint(model_dir))
    with reading(model_dir, f"{model_type} checkpoint (config.json and tensors disagree)",
                 "restore the directory from the model's source"):
        return ARCHITECTURES[model_type](src)
