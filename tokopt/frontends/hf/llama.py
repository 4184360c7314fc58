"""Llama (and SmolLM2, TinyLlama, Llama 2/3): RMSNorm, RoPE, GQA, SwiGLU."""

from tokopt.frontends.hf.builder import HFSource
from tokopt.frontends.hf.llama_like import LlamaLikeSpec, build_llama_like
from tokopt.optimizer.ir.graph import Graph


def build(src: HFSource) -> Graph:
    bias = bool(src.get("attention_bias", False))
    return build_llama_like(src, "LlamaForCausalLM", LlamaLikeSpec(qkv_bias=bias, o_bias=bias))
