"""Mistral: llama with a sliding attention window on every layer (``sliding_window``)."""

from tokopt.frontends.hf.builder import HFSource
from tokopt.frontends.hf.llama_like import (
    LlamaLikeSpec,
    build_llama_like,
    sliding_windows_from_config,
)
from tokopt.optimizer.ir.graph import Graph


def build(src: HFSource) -> Graph:
    return build_llama_like(src, "MistralForCausalLM", LlamaLikeSpec(windows=sliding_windows_from_config(src)))
