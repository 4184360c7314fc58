"""Qwen2: llama with biases on the q/k/v projections and optional per-layer sliding windows."""

from tokopt.frontends.hf.builder import HFSource
from tokopt.frontends.hf.llama_like import (
    LlamaLikeSpec,
    build_llama_like,
    sliding_windows_from_config,
)
from tokopt.optimizer.ir.graph import Graph


def build(src: HFSource) -> Graph:
    spec = LlamaLikeSpec(qkv_bias=True, windows=sliding_windows_from_config(src))
    return build_llama_like(src, "Qwen2ForCausalLM", spec)
