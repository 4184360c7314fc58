"""The decoder shared by llama, mistral, qwen2, qwen3, mixtral and qwen2_moe.

pre-norm → attention (RoPE, GQA) → residual → pre-norm → MLP or MoE → residual.
The architectures differ only in the knobs of :class:`LlamaLikeSpec` and in the MLP
block they plug in, which is why they share this one builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokopt.frontends.hf.builder import GraphBuilder, HFSource, default_scale, rope_attrs
from tokopt.optimizer.ir.graph import Graph, Value

MlpFn = Callable[[GraphBuilder, int, Value], Value]


@dataclass
class LlamaLikeSpec:
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    windows: list[int | None] | None = None  # per-layer sliding window (None = full attention)


def sliding_windows_from_config(src: HFSource) -> list[int | None]:
    """Per-layer windows from ``layer_types``/``sliding_window`` in the HF config."""
    n = src.get("num_hidden_layers")
    window = src.get("sliding_window")
    layer_types = src.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" and window else None for t in layer_types]
    if window and src.get("use_sliding_window", True):
        return [int(window)] * n
    return [None] * n


def dense_mlp(b: GraphBuilder, i: int, x: Value) -> Value:
    return b.gated_mlp(f"layers.{i}.mlp", x, f"model.layers.{i}.mlp", b.src.get("hidden_act", "silu"),
                       bias=bool(b.src.get("mlp_bias", False)))


def build_llama_like(src: HFSource, architecture: str, spec: LlamaLikeSpec, mlp: MlpFn = dense_mlp) -> Graph:
    cfg = src.config
    b = GraphBuilder(src, architecture)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = cfg.rms_norm_eps
    rope = rope_attrs(src, head_dim)
    windows = spec.windows or [None] * cfg.num_hidden_layers

    ids = b.input("input_ids")
    x = b.embedding("embed_tokens", ids, "model.embed_tokens.weight")
    for i in range(cfg.num_hidden_layers):
        p, ck = f"layers.{i}", f"model.layers.{i}"
        h = b.rms_norm(f"{p}.input_norm", x, f"{ck}.input_layernorm.weight", eps)

        def proj(n: str, bias: bool, ck: str = ck, p: str = p, h: Value = h) -> Value:
            bias_name = f"{ck}.self_attn.{n}.bias" if bias else None
            return b.linear(f"{p}.attn.{n}", h, f"{ck}.self_attn.{n}.weight", bias_name)

        q, k, v = proj("q_proj", spec.qkv_bias), proj("k_proj", spec.qkv_bias), proj("v_proj", spec.qkv_bias)
        params = {}
        attrs = {
            "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "scale": default_scale(head_dim), "rope": rope, "window": windows[i], "layer_index": i,
        }
        if spec.qk_norm:
            params = {role: b.param(f"{ck}.self_attn.{role}.weight") for role in ("q_norm", "k_norm")}
            attrs["qk_norm"] = {"eps": float(eps)}
        a = b.attention(f"{p}.attn", q, k, v, attrs, params)
        o = b.linear(f"{p}.attn.o_proj", a, f"{ck}.self_attn.o_proj.weight",
                     f"{ck}.self_attn.o_proj.bias" if spec.o_bias else None)
        x = b.add(f"{p}.attn_residual", x, o)
        h = b.rms_norm(f"{p}.post_attention_norm", x, f"{ck}.post_attention_layernorm.weight", eps)
        x = b.add(f"{p}.mlp_residual", x, mlp(b, i, h))
    x = b.rms_norm("final_norm", x, "model.norm.weight", eps)
    head = "lm_head.weight" if b.has("lm_head.weight") and not cfg.tie_word_embeddings else "model.embed_tokens.weight"
    return b.finish(b.linear("lm_head", x, head))
