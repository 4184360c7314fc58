"""Gemma 2 and Gemma 3 (text): the llama decoder with every Gemma difference carried by the IR.

- RMSNorm multiplies by ``1 + weight``: the frontend stores ``1 + w`` (fp32, as Gemma computes it);
- sandwich norms: pre- and post-norm around both attention and the MLP;
- the embedding is scaled by √hidden (a ``Scale`` node: the table is also the tied lm_head);
- attention scale ``query_pre_attn_scalar ** -0.5``, head_dim independent of hidden/heads;
- attention-logit soft-capping (Gemma 2) and final-logit soft-capping (a ``Softcap`` node);
- alternating local (sliding-window) and global layers (``layer_types``), each type with its own
  RoPE parameters (Gemma 3: a local base of 10k, a global base of 1M with optional scaling);
- GeGLU with tanh-approximated GELU; per-head q/k norms (Gemma 3, with ``1 + w`` too).
"""

from __future__ import annotations

import math

from tokopt.errors import UnsupportedArchitectureError
from tokopt.frontends.hf.builder import GraphBuilder, HFSource, rope_attrs
from tokopt.frontends.hf.llama_like import LlamaLikeSpec, build_llama_like
from tokopt.optimizer.ir.graph import Graph, Value

#: Gemma's RMSNorm multiplies by ``NORM_OFFSET + weight``; the model types that do.
NORM_OFFSET = 1.0
NORM_OFFSET_TYPES = ("gemma2", "gemma3_text")


def _layer_types(src: HFSource) -> list[str]:
    n = src.get("num_hidden_layers")
    types = src.get("layer_types")
    if not types:  # Gemma 2 before layer_types: even layers local, odd layers global
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return list(types)


def _spec(src: HFSource, qk_norm: bool) -> LlamaLikeSpec:
    if src.get("use_bidirectional_attention", False):
        raise UnsupportedArchitectureError("Gemma with use_bidirectional_attention=True (an encoder) is not a "
                                           "decoder tokopt can serve; only causal attention is supported")
    head_dim = src.get("head_dim") or src.get("hidden_size") // src.get("num_attention_heads")
    types = _layer_types(src)
    ropes = {t: rope_attrs(src, head_dim, t) for t in set(types)}
    window = src.get("sliding_window")
    windows = [int(window) if t == "sliding_attention" and window else None for t in types]
    return LlamaLikeSpec(
        qkv_bias=bool(src.get("attention_bias", False)), o_bias=bool(src.get("attention_bias", False)),
        qk_norm="head" if qk_norm else None, windows=windows, ropes=[ropes[t] for t in types],
        norms="sandwich", norm_offset=NORM_OFFSET, embed_scale=math.sqrt(src.get("hidden_size")),
        attention_scale=float(src.get("query_pre_attn_scalar")) ** -0.5,
        attn_softcap=src.get("attn_logit_softcapping"), final_softcap=src.get("final_logit_softcapping"))


def _geglu(b: GraphBuilder, i: int, x: Value) -> Value:
    act = b.src.get("hidden_activation") or b.src.get("hidden_act") or "gelu_pytorch_tanh"
    return b.gated_mlp(f"layers.{i}.mlp", x, f"model.layers.{i}.mlp", act)


def build_gemma2(src: HFSource) -> Graph:
    return build_llama_like(src, "Gemma2ForCausalLM", _spec(src, qk_norm=False), _geglu)


def build_gemma3(src: HFSource) -> Graph:
    return build_llama_like(src, "Gemma3ForCausalLM", _spec(src, qk_norm=True), _geglu)
