"""Mixtral: llama attention with a sparse mixture of SwiGLU experts (top-k, renormalised)."""

from tokopt.frontends.hf.builder import GraphBuilder, HFSource
from tokopt.frontends.hf.llama_like import (
    LlamaLikeSpec,
    build_llama_like,
    sliding_windows_from_config,
)
from tokopt.frontends.hf.moe import expert_params, moe_node
from tokopt.optimizer.ir.graph import Graph, Value


def _moe(b: GraphBuilder, i: int, x: Value) -> Value:
    cfg = b.src.config
    ck = f"model.layers.{i}.block_sparse_moe"
    if not b.has(f"{ck}.gate.weight"):
        ck = f"model.layers.{i}.mlp"
    params = {"router": b.param(f"{ck}.gate.weight"),
              **expert_params(b, ck, cfg.num_local_experts, ("w1", "w3", "w2"))}
    attrs = {"num_experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok,
             "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
             "norm_topk_prob": True, "activation": "silu"}
    return moe_node(b, f"layers.{i}.moe", x, params, attrs)


def build(src: HFSource) -> Graph:
    return build_llama_like(src, "MixtralForCausalLM", LlamaLikeSpec(windows=sliding_windows_from_config(src)), _moe)
