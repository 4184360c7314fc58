"""Qwen3-MoE: qwen3 attention (per-head q/k norms); routed experts without a shared expert.

Routing renormalises the top-k weights only when ``norm_topk_prob`` says so (both ways occur
in released checkpoints).  Layers in ``mlp_only_layers`` or off the ``decoder_sparse_step``
grid keep a dense SwiGLU MLP, as transformers builds them.
"""

from tokopt.frontends.hf.builder import GraphBuilder, HFSource
from tokopt.frontends.hf.llama_like import LlamaLikeSpec, build_llama_like, dense_mlp, sliding_windows_from_config
from tokopt.frontends.hf.moe import expert_params, moe_node
from tokopt.optimizer.ir.graph import Graph, Value


def _block(b: GraphBuilder, i: int, x: Value) -> Value:
    cfg = b.src.config
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    if i in (getattr(cfg, "mlp_only_layers", None) or []) or cfg.num_experts == 0 or (i + 1) % step:
        return dense_mlp(b, i, x)
    ck = f"model.layers.{i}.mlp"
    params = {"router": b.param(f"{ck}.gate.weight"),
              **expert_params(b, ck, cfg.num_experts, ("gate_proj", "up_proj", "down_proj"))}
    attrs = {"num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "hidden_size": cfg.hidden_size,
             "intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": bool(cfg.norm_topk_prob),
             "activation": "silu"}
    return moe_node(b, f"layers.{i}.moe", x, params, attrs)


def build(src: HFSource) -> Graph:
    bias = bool(src.get("attention_bias", False))
    spec = LlamaLikeSpec(qkv_bias=bias, o_bias=bias, qk_norm="head", windows=sliding_windows_from_config(src))
    return build_llama_like(src, "Qwen3MoeForCausalLM", spec, _block)
