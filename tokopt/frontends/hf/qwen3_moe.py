"""Qwen3-MoE: qwen3 attention (per-head q/k norms); routed experts without a shared expert.

Routing renormalises the top-k weights only when ``norm_topk_prob`` says so (both ways occur
in released checkpoints).  Layers in ``mlp_only_layers`` or off the ``decoder_sparse_step``
grid keep a dense SwiGLU MLP, as transformers builds them.
"""

from tokopt.frontends.hf.builder import GraphBuilder, HFSource
from tokopt.frontends.hf.llama_like import LlamaLikeSpec, build_llama_like, dense_mlp, sliding_windows_from_config
from tokopt.frontends.hf.moe import is_sparse_layer, moe_node, qwen_routed_experts
from tokopt.optimizer.ir.graph import Graph, Value


def _block(b: GraphBuilder, i: int, x: Value) -> Value:
    if not is_sparse_layer(b.src.config, i):
        return dense_mlp(b, i, x)
    params, attrs = qwen_routed_experts(b, i)
    return moe_node(b, f"layers.{i}.moe", x, params, attrs)


def build(src: HFSource) -> Graph:
    bias = bool(src.get("attention_bias", False))
    spec = LlamaLikeSpec(qkv_bias=bias, o_bias=bias, qk_norm="head", windows=sliding_windows_from_config(src))
    return build_llama_like(src, "Qwen3MoeForCausalLM", spec, _block)
