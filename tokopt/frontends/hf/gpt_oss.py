"""gpt-oss: attention with biases and learned per-head sink logits, alternating sliding/full
layers, and an MoE whose router has a bias, routes by softmax over the top-k logits, and whose
experts (with biases) use a clamped SwiGLU.

The checkpoint stores the experts fused and interleaved — ``gate_up_proj`` (E, H, 2I) with gate
in the even and up in the odd columns, applied as ``x @ W`` — and ``down_proj`` as (E, I, H);
the frontend re-lays them (lazily) as the IR's (E, I, H) gate/up and (E, H, I) down.  MXFP4
checkpoints are dequantized by transformers' loader before tokopt sees them, or refused.
"""

from __future__ import annotations

from tokopt.frontends.hf.builder import GraphBuilder, HFSource
from tokopt.frontends.hf.llama_like import LlamaLikeSpec, build_llama_like, sliding_windows_from_config
from tokopt.optimizer.ir.graph import Graph, Value


def _experts(b: GraphBuilder, ck: str) -> dict[str, str]:
    gate_up_key, down_key = f"{ck}.experts.gate_up_proj", f"{ck}.experts.down_proj"
    for key in (gate_up_key, down_key, f"{gate_up_key}_bias", f"{down_key}_bias"):
        if key not in b.src.tensors:
            b.param(key)  # raises, naming the missing tensor
    gate_up, gate_up_bias = b.src.tensors[gate_up_key], b.src.tensors[f"{gate_up_key}_bias"]
    down = b.src.tensors[down_key]
    e, h, two_i = gate_up.shape
    i = two_i // 2
    return {
        "experts.gate": b.derived_param(f"{ck}.experts.gate",
                                       gate_up.derive((e, i, h), lambda t: t[..., 0::2].transpose(1, 2).contiguous())),
        "experts.up": b.derived_param(f"{ck}.experts.up",
                                     gate_up.derive((e, i, h), lambda t: t[..., 1::2].transpose(1, 2).contiguous())),
        "experts.down": b.derived_param(f"{ck}.experts.down",
                                       down.derive((e, h, i), lambda t: t.transpose(1, 2).contiguous())),
        "experts.gate_bias": b.derived_param(f"{ck}.experts.gate_bias",
                                            gate_up_bias.derive((e, i), lambda t: t[:, 0::2].contiguous())),
        "experts.up_bias": b.derived_param(f"{ck}.experts.up_bias",
                                          gate_up_bias.derive((e, i), lambda t: t[:, 1::2].contiguous())),
        "experts.down_bias": b.param(f"{down_key}_bias"),
    }


def _moe(b: GraphBuilder, i: int, x: Value) -> Value:
    cfg = b.src.config
    ck = f"model.layers.{i}.mlp"
    params = {"router": b.param(f"{ck}.router.weight"), "router_bias": b.param(f"{ck}.router.bias"), **_experts(b, ck)}
    attrs = {"num_experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok, "hidden_size": cfg.hidden_size,
             "intermediate_size": cfg.intermediate_size, "norm_topk_prob": False, "routing": "topk_softmax",
             "activation": "silu",
             "glu": {"kind": "clamped_swiglu", "alpha": float(cfg.swiglu_alpha), "limit": float(cfg.swiglu_limit)}}
    return b.graph.add_node("MoE", f"layers.{i}.moe", [x], attrs, params)


def build(src: HFSource) -> Graph:
    bias = bool(src.get("attention_bias", True))
    spec = LlamaLikeSpec(qkv_bias=bias, o_bias=bias, windows=sliding_windows_from_config(src), sink_logits=True)
    return build_llama_like(src, "GptOssForCausalLM", spec, _moe)
