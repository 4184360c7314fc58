"""Building an ``MoE`` node from per-expert or fused checkpoint tensors."""

from __future__ import annotations

from tokopt.frontends.hf.builder import GraphBuilder, stacked
from tokopt.optimizer.ir.graph import Value


def expert_params(b: GraphBuilder, ckpt: str, num_experts: int, names: tuple[str, str, str]) -> dict[str, str]:
    """Stacked (E, I, H) gate/up and (E, H, I) down parameters for the experts under ``ckpt``.

    Reads per-expert tensors (``experts.{j}.{name}.weight``, the saved format) or the
    fused ``experts.gate_up_proj``/``experts.down_proj`` layout some checkpoints use.
    """
    fused = f"{ckpt}.experts.gate_up_proj"
    if b.has(fused):
        gate_up = b.src.tensors[fused]
        e, two_i, h = gate_up.shape
        i = two_i // 2
        gate = gate_up.derive((e, i, h), lambda t: t[:, :i].contiguous())
        up = gate_up.derive((e, i, h), lambda t: t[:, i:].contiguous())
        return {
            "experts.gate": b.derived_param(f"{ckpt}.experts.gate", gate),
            "experts.up": b.derived_param(f"{ckpt}.experts.up", up),
            "experts.down": b.param(f"{ckpt}.experts.down_proj"),
        }
    out = {}
    for role, n in zip(("experts.gate", "experts.up", "experts.down"), names, strict=True):
        parts = [b.src.tensors.get(f"{ckpt}.experts.{j}.{n}.weight") for j in range(num_experts)]
        if any(p is None for p in parts):
            b.param(f"{ckpt}.experts.{parts.index(None)}.{n}.weight")  # raises naming the missing tensor
        out[role] = b.derived_param(f"{ckpt}.experts.{n}", stacked(parts))
    return out


def moe_node(b: GraphBuilder, name: str, x: Value, params: dict[str, str], attrs: dict) -> Value:
    return b.graph.add_node("MoE", name, [x], attrs, params)


def is_sparse_layer(cfg: object, i: int) -> bool:
    """Whether decoder layer ``i`` of a Qwen-style MoE config routes experts: not in ``mlp_only_layers``, on the
    ``decoder_sparse_step`` grid, and the model has experts (the others keep a dense MLP, as transformers builds)."""
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return i not in (getattr(cfg, "mlp_only_layers", None) or []) and cfg.num_experts > 0 and (i + 1) % step == 0


def qwen_routed_experts(b: GraphBuilder, i: int) -> tuple[dict[str, str], dict]:
    """Router and stacked experts (params, attrs) of a Qwen-style MoE layer (Qwen2-MoE, Qwen3-MoE)."""
    cfg = b.src.config
    ck = f"model.layers.{i}.mlp"
    params = {"router": b.param(f"{ck}.gate.weight"),
              **expert_params(b, ck, cfg.num_experts, ("gate_proj", "up_proj", "down_proj"))}
    attrs = {"num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "hidden_size": cfg.hidden_size,
             "intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": bool(cfg.norm_topk_prob),
             "activation": "silu"}
    return params, attrs
