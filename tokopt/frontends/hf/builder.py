"""Shared pieces for building the IR from a Hugging Face checkpoint.

Per-architecture modules (``llama.py``, ``gpt2.py`` …) describe only what makes their
architecture different and call these helpers for the rest, so a new architecture is a
page of code.  Node names follow the layer structure (``layers.3.attn.q_proj``);
parameter names are the checkpoint's own, so a user can map any node back to its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokopt.errors import ModelSourceError, UnsupportedArchitectureError
from tokopt.optimizer.ir.graph import Graph, ModelMeta, Value
from tokopt.optimizer.ir.ops import DEFAULT_KV_CACHE
from tokopt.optimizer.ir.weights import LazyTensor

HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu",
}


@dataclass
class HFSource:
    """A checkpoint directory opened for building: config (object and dict) + lazy tensors."""

    path: Path
    config: Any  # transformers PretrainedConfig
    config_dict: dict[str, Any]
    tensors: dict[str, LazyTensor]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self.config, key, default)


class GraphBuilder:
    """Accumulates nodes and parameters for one model."""

    def __init__(self, src: HFSource, architecture: str) -> None:
        cfg = src.config
        self.src = src
        eos = cfg.eos_token_id
        self.graph = Graph(ModelMeta(
            architecture=architecture,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=src.get("hidden_size") or src.get("n_embd"),
            num_layers=src.get("num_hidden_layers") or src.get("n_layer"),
            max_positions=src.get("max_position_embeddings") or src.get("n_positions") or 0,
            source=str(src.path),
            tokenizer_path=str(src.path),
            bos_token_id=cfg.bos_token_id,
            eos_token_id=eos,
            hf_config=src.config_dict,
        ))
        self.graph.history.append(f"frontend:hf:{cfg.model_type}")

    # -- parameters -----------------------------------------------------------------
    def param(self, key: str) -> str:
        """Register checkpoint tensor ``key`` as a parameter (weights stay lazy)."""
        if key not in self.graph.params:
            if key not in self.src.tensors:
                raise ModelSourceError(f"checkpoint {self.src.path} lacks tensor {key!r}")
            self.graph.add_param(key, self.src.tensors[key])
        return key

    def has(self, key: str) -> bool:
        return key in self.src.tensors

    def derived_param(self, key: str, value: LazyTensor) -> str:
        self.graph.add_param(key, value)
        return key

    # -- ops ------------------------------------------------------------------------
    def input(self, kind: str) -> Value:
        return self.graph.add_node("Input", kind, attrs={"kind": kind})

    def embedding(self, name: str, ids: Value, weight: str) -> Value:
        return self.graph.add_node("Embedding", name, [ids], params={"weight": self.param(weight)})

    def rms_norm(self, name: str, x: Value, weight: str, eps: float, offset: float = 0.0) -> Value:
        return self.graph.add_node("RMSNorm", name, [x], {"eps": float(eps)},
                                   {"weight": self.norm_weight(weight, offset)})

    def norm_weight(self, key: str, offset: float = 0.0) -> str:
        """A norm's weight; Gemma's ``x * (1 + w)`` norms get ``1 + w`` (computed in fp32, as Gemma does)."""
        if not offset:
            return self.param(key)
        if key not in self.src.tensors:
            self.param(key)  # raises, naming the missing tensor
        name = f"{key}+{offset:g}"
        if name not in self.graph.params:
            src = self.src.tensors[key]
            self.derived_param(name, LazyTensor(src.shape, "float32", lambda: src.materialize().float() + offset))
        return name

    def scale(self, name: str, x: Value, factor: float | None) -> Value:
        """``x * factor`` as a Scale node; no node when there is no factor (or it is 1)."""
        if factor is None or float(factor) == 1.0:
            return x
        return self.graph.add_node("Scale", name, [x], {"factor": float(factor)})

    def layer_norm(self, name: str, x: Value, weight: str, bias: str | None, eps: float) -> Value:
        params = {"weight": self.param(weight)}
        if bias is not None:
            params["bias"] = self.param(bias)
        return self.graph.add_node("LayerNorm", name, [x], {"eps": float(eps)}, params)

    def linear(self, name: str, x: Value, weight: str, bias: str | None = None) -> Value:
        params = {"weight": weight if weight in self.graph.params else self.param(weight)}
        if bias is not None:
            params["bias"] = bias if bias in self.graph.params else self.param(bias)
        return self.graph.add_node("Linear", name, [x], params=params)

    def activation(self, name: str, x: Value, hf_name: str) -> Value:
        kind = HF_ACTIVATIONS.get(hf_name)
        if kind is None:
            raise UnsupportedArchitectureError(
                f"activation {hf_name!r} is not supported; supported: {', '.join(sorted(HF_ACTIVATIONS))}")
        return self.graph.add_node("Activation", name, [x], {"kind": kind})

    def add(self, name: str, a: Value, b: Value) -> Value:
        return self.graph.add_node("Add", name, [a, b])

    def mul(self, name: str, a: Value, b: Value) -> Value:
        return self.graph.add_node("Mul", name, [a, b])

    def gated_mlp(self, prefix: str, x: Value, ckpt: str, act: str, names=("gate_proj", "up_proj", "down_proj"),
                  bias: bool = False) -> Value:
        """down(act(gate(x)) * up(x)) — the SwiGLU block of llama-family models."""
        g, u, d = names

        def b(n: str) -> str | None:
            return f"{ckpt}.{n}.bias" if bias else None

        gate = self.linear(f"{prefix}.{g}", x, f"{ckpt}.{g}.weight", b(g))
        up = self.linear(f"{prefix}.{u}", x, f"{ckpt}.{u}.weight", b(u))
        h = self.mul(f"{prefix}.mul", self.activation(f"{prefix}.act", gate, act), up)
        return self.linear(f"{prefix}.{d}", h, f"{ckpt}.{d}.weight", b(d))

    def attention(self, name: str, q: Value, k: Value, v: Value, attrs: dict[str, Any],
                  params: dict[str, str] | None = None) -> Value:
        full = {"kv_cache": dict(DEFAULT_KV_CACHE), **attrs}
        return self.graph.add_node("Attention", name, [q, k, v], full, params)

    def finish(self, logits: Value) -> Graph:
        self.graph.outputs["logits"] = logits
        return self.graph


def rope_attrs(src: HFSource, head_dim: int, layer_type: str | None = None) -> dict[str, Any]:
    """RoPE attributes with inverse frequencies precomputed from the HF config.

    Storing ``inv_freq`` makes every executor and backend agree bit-for-bit on the
    frequencies, whatever scaling recipe (linear, llama3, yarn, longrope) produced them.
    ``layer_type`` picks one layer type's parameters where the config has one set per type
    (Gemma 3: local layers on one base, global layers on another).  LongRoPE (Phi-3) stores
    both its frequency sets and the position where transformers switches between them.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = src.config
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    else:
        layer_type = None
    if not params:  # transformers 4.x layout
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)
    rotary_dim = int(head_dim * partial)
    by_type = {"layer_type": layer_type} if layer_type is not None else {}
    extra: dict[str, Any] = {}
    if rope_type == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        factor = 1.0
    elif rope_type in ("linear", "llama3", "yarn"):
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"), **by_type)
    elif rope_type == "longrope":
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"), **by_type)
        original = int(params.get("original_max_position_embeddings")
                       or getattr(cfg, "original_max_position_embeddings", 0) or cfg.max_position_embeddings)
        long, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"), seq_len=original + 1, **by_type)
        extra = {"long_inv_freq": [float(f) for f in long.float()], "original_max_positions": original}
    else:
        raise UnsupportedArchitectureError(
            f"rope type {rope_type!r} is not supported (its frequencies depend on the sequence length); "
            "supported: default, linear, llama3, yarn, longrope")
    return {
        "theta": theta, "type": rope_type, "rotary_dim": rotary_dim, "interleaved": False,
        "inv_freq": [float(f) for f in inv_freq.float()], "attention_factor": float(factor), **extra,
    }


def stacked(tensors: list[LazyTensor]) -> LazyTensor:
    """Stack per-expert tensors into one (E, …) lazy tensor."""
    shape = (len(tensors), *tensors[0].shape)
    return LazyTensor(shape, tensors[0].dtype, lambda: torch.stack([t.materialize() for t in tensors]))


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
