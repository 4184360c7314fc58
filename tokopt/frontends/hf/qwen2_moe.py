"""Qwen2-MoE: qwen2 attention; routed experts plus a sigmoid-gated shared expert.

Layers listed in ``mlp_only_layers`` (or off the ``decoder_sparse_step`` grid) keep a
dense SwiGLU MLP, exactly as transformers builds them.
"""

from tokopt.frontends.hf.builder import GraphBuilder, HFSource
from tokopt.frontends.hf.llama_like import (
    LlamaLikeSpec,
    build_llama_like,
    dense_mlp,
    sliding_windows_from_config,
)
from tokopt.frontends.hf.moe import is_sparse_layer, moe_node, qwen_routed_experts
from tokopt.optimizer.ir.graph import Graph, Value


def _block(b: GraphBuilder, i: int, x: Value) -> Value:
    cfg = b.src.config
    if not is_sparse_layer(cfg, i):
        return dense_mlp(b, i, x)
    ck = f"model.layers.{i}.mlp"
    params, attrs = qwen_routed_experts(b, i)
    if b.has(f"{ck}.shared_expert.gate_proj.weight"):
        for role, n in (("shared.gate", "gate_proj"), ("shared.up", "up_proj"), ("shared.down", "down_proj")):
            params[role] = b.param(f"{ck}.shared_expert.{n}.weight")
        params["shared_gate"] = b.param(f"{ck}.shared_expert_gate.weight")
        attrs["shared_intermediate_size"] = cfg.shared_expert_intermediate_size
        attrs["shared_gate"] = True
    return moe_node(b, f"layers.{i}.moe", x, params, attrs)


def build(src: HFSource) -> Graph:
    spec = LlamaLikeSpec(qkv_bias=True, windows=sliding_windows_from_config(src))
    return build_llama_like(src, "Qwen2MoeForCausalLM", spec, _block)
