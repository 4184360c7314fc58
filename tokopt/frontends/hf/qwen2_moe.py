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
from tokopt.frontends.hf.moe import expert_params, moe_node
from tokopt.optimizer.ir.graph import Graph, Value


def _block(b: GraphBuilder, i: int, x: Value) -> Value:
    cfg = b.src.config
    sparse = i not in (cfg.mlp_only_layers or []) and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0
    if not sparse:
        return dense_mlp(b, i, x)
    ck = f"model.layers.{i}.mlp"
    params = {"router": b.param(f"{ck}.gate.weight"),
              **expert_params(b, ck, cfg.num_experts, ("gate_proj", "up_proj", "down_proj"))}
    attrs = {"num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "hidden_size": cfg.hidden_size,
             "intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": bool(cfg.norm_topk_prob),
             "activation": "silu"}
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
