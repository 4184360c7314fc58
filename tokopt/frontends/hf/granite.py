"""Granite: llama with four multipliers — embedding, residual (each branch before its add),
attention (the softmax scale itself) and logits (divided by ``logits_scaling``) — as ``Scale``
nodes and the Attention's ``scale``."""

from tokopt.frontends.hf.builder import HFSource
from tokopt.frontends.hf.llama_like import LlamaLikeSpec, build_llama_like
from tokopt.optimizer.ir.graph import Graph


def build(src: HFSource) -> Graph:
    bias = bool(src.get("attention_bias", False))
    spec = LlamaLikeSpec(qkv_bias=bias, o_bias=bias, embed_scale=src.get("embedding_multiplier"),
                         residual_scale=src.get("residual_multiplier"),
                         attention_scale=src.get("attention_multiplier"),
                         logits_scale=1.0 / float(src.get("logits_scaling") or 1.0))
    return build_llama_like(src, "GraniteForCausalLM", spec)
