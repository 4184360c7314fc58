"""OLMo 2: post-norm decoder (norms after attention and after the MLP, none before) with q/k
RMSNorms over the whole projection (not per head) — plain ``RMSNorm`` nodes on the q/k Linears."""

from tokopt.frontends.hf.builder import HFSource
from tokopt.frontends.hf.llama_like import LlamaLikeSpec, build_llama_like
from tokopt.optimizer.ir.graph import Graph


def build(src: HFSource) -> Graph:
    bias = bool(src.get("attention_bias", False))
    return build_llama_like(src, "Olmo2ForCausalLM", LlamaLikeSpec(qkv_bias=bias, o_bias=bias, qk_norm="proj",
                                                                   norms="post"))
