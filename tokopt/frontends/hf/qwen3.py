"""Qwen3: llama with per-head RMSNorm on queries and keys (q_norm/k_norm) before RoPE."""

from tokopt.frontends.hf.builder import HFSource
from tokopt.frontends.hf.llama_like import (
    LlamaLikeSpec,
    build_llama_like,
    sliding_windows_from_config,
)
from tokopt.optimizer.ir.graph import Graph


def build(src: HFSource) -> Graph:
    bias = bool(src.get("attention_bias", False))
    spec = LlamaLikeSpec(qkv_bias=bias, o_bias=bias, qk_norm="head", windows=sliding_windows_from_config(src))
    return build_llama_like(src, "Qwen3ForCausalLM", spec)
