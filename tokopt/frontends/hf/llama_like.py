"""The decoder shared by every llama-descended family tokopt reads.

norm → attention (RoPE, GQA) → residual → norm → MLP or MoE → residual.  The families differ
in the knobs of :class:`LlamaLikeSpec` — where the norms sit (pre, sandwich, post), Gemma's
``1 + w`` norms and √hidden embedding, Granite's multipliers, soft-capping, per-layer RoPE or
none (NoPE), per-head or whole-projection q/k norms, gpt-oss's learned sinks — and in the MLP
block they plug in, which is why they share this one builder.  Each knob becomes an IR node or
attribute (never a silent approximation): see the README's architecture table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokopt.frontends.hf.builder import GraphBuilder, HFSource, default_scale, rope_attrs
from tokopt.optimizer.ir.graph import Graph, Value

MlpFn = Callable[[GraphBuilder, int, Value], Value]

#: Where each decoder layer's norms sit, and the checkpoint names they use:
#: (before attention, after attention, before the MLP, after the MLP).
NORM_PLACEMENTS: dict[str, tuple[str | None, str | None, str | None, str | None]] = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),  # llama
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),  # Gemma 2/3
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),  # OLMo 2
}


@dataclass
class LlamaLikeSpec:
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # "head": per-head RMSNorm (Qwen3, Gemma 3); "proj": over the whole projection (OLMo 2)
    windows: list[int | None] | None = None  # per-layer sliding window (None = full attention)
    ropes: list[dict[str, Any] | None] | None = None  # per-layer RoPE (None in the list = NoPE); default: one RoPE
    norms: str = "pre"
    norm_offset: float = 0.0  # Gemma: RMSNorm multiplies by (1 + weight)
    embed_scale: float | None = None  # Gemma: sqrt(hidden); Granite: embedding_multiplier
    residual_scale: float | None = None  # Granite: residual_multiplier on each branch
    attention_scale: float | None = None  # default 1/sqrt(head_dim)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    logits_scale: float | None = None  # Granite: logits / logits_scaling
    sink_logits: bool = False  # gpt-oss: self_attn.sinks


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


def attention_projections(b: GraphBuilder, p: str, ck: str, h: Value,
                          spec: LlamaLikeSpec) -> tuple[Value, Value, Value]:
    """q, k, v from separate ``{q,k,v}_proj`` Linears (a family with a fused qkv overrides this)."""
    def proj(n: str) -> Value:
        bias_name = f"{ck}.self_attn.{n}.bias" if spec.qkv_bias else None
        return b.linear(f"{p}.attn.{n}", h, f"{ck}.self_attn.{n}.weight", bias_name)

    return proj("q_proj"), proj("k_proj"), proj("v_proj")


ProjFn = Callable[[GraphBuilder, str, str, Value, LlamaLikeSpec], tuple[Value, Value, Value]]


def build_llama_like(src: HFSource, architecture: str, spec: LlamaLikeSpec, mlp: MlpFn = dense_mlp,
                     projections: ProjFn = attention_projections) -> Graph:
    cfg = src.config
    b = GraphBuilder(src, architecture)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = cfg.rms_norm_eps
    n = cfg.num_hidden_layers
    ropes = spec.ropes if spec.ropes is not None else [rope_attrs(src, head_dim)] * n
    windows = spec.windows or [None] * n
    before_attn, after_attn, before_mlp, after_mlp = NORM_PLACEMENTS[spec.norms]

    def norm(name: str, x: Value, key: str | None) -> Value:
        return x if key is None else b.rms_norm(name, x, f"{key}.weight", eps, spec.norm_offset)

    ids = b.input("input_ids")
    x = b.scale("embed_scale", b.embedding("embed_tokens", ids, "model.embed_tokens.weight"), spec.embed_scale)
    for i in range(n):
        p, ck = f"layers.{i}", f"model.layers.{i}"
        h = norm(f"{p}.input_norm", x, before_attn and f"{ck}.{before_attn}")
        q, k, v = projections(b, p, ck, h, spec)
        params = {}
        attrs = {
            "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "scale": spec.attention_scale or default_scale(head_dim), "rope": ropes[i], "window": windows[i],
            "softcap": spec.attn_softcap, "layer_index": i,
        }
        if spec.qk_norm == "head":
            params = {role: b.norm_weight(f"{ck}.self_attn.{role}.weight", spec.norm_offset)
                      for role in ("q_norm", "k_norm")}
            attrs["qk_norm"] = {"eps": float(eps)}
        elif spec.qk_norm == "proj":
            q = b.rms_norm(f"{p}.attn.q_norm", q, f"{ck}.self_attn.q_norm.weight", eps)
            k = b.rms_norm(f"{p}.attn.k_norm", k, f"{ck}.self_attn.k_norm.weight", eps)
        if spec.sink_logits:
            params["sink_logits"] = b.param(f"{ck}.self_attn.sinks")
        a = b.attention(f"{p}.attn", q, k, v, attrs, params)
        o = b.linear(f"{p}.attn.o_proj", a, f"{ck}.self_attn.o_proj.weight",
                     f"{ck}.self_attn.o_proj.bias" if spec.o_bias else None)
        o = b.scale(f"{p}.attn_residual_scale", norm(f"{p}.post_attn_norm", o, after_attn and f"{ck}.{after_attn}"),
                    spec.residual_scale)
        x = b.add(f"{p}.attn_residual", x, o)
        h = norm(f"{p}.post_attention_norm", x, before_mlp and f"{ck}.{before_mlp}")
        m = norm(f"{p}.post_mlp_norm", mlp(b, i, h), after_mlp and f"{ck}.{after_mlp}")
        x = b.add(f"{p}.mlp_residual", x, b.scale(f"{p}.mlp_residual_scale", m, spec.residual_scale))
    x = b.rms_norm("final_norm", x, "model.norm.weight", eps, spec.norm_offset)
    head = "lm_head.weight" if b.has("lm_head.weight") and not cfg.tie_word_embeddings else "model.embed_tokens.weight"
    logits = b.scale("logits_scale", b.linear("lm_head", x, head), spec.logits_scale)
    if spec.final_softcap:
        logits = b.graph.add_node("Softcap", "final_softcap", [logits], {"cap": float(spec.final_softcap)})
    return b.finish(logits)
