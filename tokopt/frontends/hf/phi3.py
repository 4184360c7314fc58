"""Phi-3 / 3.5 / 4-mini: llama with fused projections and LongRoPE.

``qkv_proj`` and ``gate_up_proj`` are split (lazily, by rows) into the IR's separate Linears, so
every pass sees the same attention and MLP structure as in llama.  LongRoPE (``rope_type``
"longrope", Phi-3.5/4) stores both frequency sets and the switch point
(:func:`~tokopt.frontends.hf.builder.rope_attrs`); partial rotary (Phi-4-mini) is ``rotary_dim``.
"""

from __future__ import annotations

from tokopt.frontends.hf.builder import GraphBuilder, HFSource
from tokopt.frontends.hf.llama_like import LlamaLikeSpec, build_llama_like, sliding_windows_from_config
from tokopt.optimizer.ir.graph import Graph, Value


def _rows(b: GraphBuilder, key: str, start: int, stop: int) -> str:
    """Rows ``[start, stop)`` of checkpoint tensor ``key`` as their own (lazy) parameter."""
    if key not in b.src.tensors:
        b.param(key)  # raises, naming the missing tensor
    src = b.src.tensors[key]
    return b.derived_param(f"{key}[{start}:{stop}]",
                           src.derive((stop - start, *src.shape[1:]), lambda t: t[start:stop].contiguous()))


def _qkv(b: GraphBuilder, p: str, ck: str, h: Value, spec: LlamaLikeSpec) -> tuple[Value, Value, Value]:
    cfg = b.src.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_out, kv_out = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    key = f"{ck}.self_attn.qkv_proj.weight"
    bounds = {"q_proj": (0, q_out), "k_proj": (q_out, q_out + kv_out), "v_proj": (q_out + kv_out, q_out + 2 * kv_out)}
    return tuple(b.linear(f"{p}.attn.{n}", h, _rows(b, key, lo, hi)) for n, (lo, hi) in bounds.items())


def _mlp(b: GraphBuilder, i: int, x: Value) -> Value:
    inter = b.src.get("intermediate_size")
    prefix, key = f"layers.{i}.mlp", f"model.layers.{i}.mlp.gate_up_proj.weight"
    gate = b.linear(f"{prefix}.gate_proj", x, _rows(b, key, 0, inter))
    up = b.linear(f"{prefix}.up_proj", x, _rows(b, key, inter, 2 * inter))
    h = b.mul(f"{prefix}.mul", b.activation(f"{prefix}.act", gate, b.src.get("hidden_act", "silu")), up)
    return b.linear(f"{prefix}.down_proj", h, f"model.layers.{i}.mlp.down_proj.weight")


def build(src: HFSource) -> Graph:
    spec = LlamaLikeSpec(windows=sliding_windows_from_config(src))
    return build_llama_like(src, "Phi3ForCausalLM", spec, _mlp, _qkv)
