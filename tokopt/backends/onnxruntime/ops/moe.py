"""Mixture of experts, decomposed into standard ops.

Every expert runs on every token and the router's top-k weights (zero elsewhere) combine
them: E/k times the expert FLOPs of a sparse kernel, but exact and expressible for any
expert count, activation and routing normalisation.  (onnxruntime's CPU ``MoE`` contrib
op is fp32-only and wants gate/up interleaved for SwiGLU; it is a later fast path.)

Quantized experts (int4/int8 stacks) run as two MatMulNBits for all experts: gate/up read the
stack's rows as one ``(E*I, H)`` matrix, and down reads its experts laid side by side as one
``(H, E*I)`` matrix applied to the routing-weighted hidden states — zero weight for the experts a
token did not choose, so the sum is exactly the routed one.
"""

from __future__ import annotations

from tokopt.backends.onnxruntime.lower import LowerContext
from tokopt.backends.onnxruntime.ops import nbits, register_lowering
from tokopt.backends.onnxruntime.ops.basic import activation
from tokopt.backends.onnxruntime.ops.linear import linear
from tokopt.optimizer.ir.graph import Node
from tokopt.optimizer.ir.weights import QuantizedWeight


@register_lowering("MoE")
def lower_moe(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    a, b, p = node.attrs, ctx.b, node.params
    e, hidden, inter, top_k = a["num_experts"], a["hidden_size"], a["intermediate_size"], a["top_k"]
    x = inputs[0]
    flat = b.op("Reshape", [x, b.const([-1, hidden])], name=f"{node.name}/flatten")  # (N, H)
    logits = linear(ctx, flat, p["router"], p.get("router_bias"), f"{node.name}/router")
    if a.get("routing", "softmax_topk") == "topk_softmax":
        top_l, top_i = b.op("TopK", [logits, b.const([top_k])], axis=-1, outputs=2, name=f"{node.name}/topk")
        top_w = b.op("Softmax", [top_l], axis=-1)
    else:
        probs = b.op("Softmax", [logits], axis=-1)
        top_w, top_i = b.op("TopK", [probs, b.const([top_k])], axis=-1, outputs=2, name=f"{node.name}/topk")
        if a["norm_topk_prob"]:
            top_w = b.op("Div", [top_w, b.op("ReduceSum", [top_w, b.const([-1])], keepdims=1)])
    zeros = b.op("ConstantOfShape", [b.op("Shape", [logits])])
    routing = b.op("ScatterElements", [zeros, top_i, top_w], axis=1, name=f"{node.name}/routing")  # (N, E)

    def stacked_in(role: str) -> str:  # (E, I, H) → (H, E*I): one MatMul for all experts
        return ctx.weight_init(p[role], "stackedT", lambda t: t.reshape(e * inter, hidden).t())

    def projected(role: str) -> str:  # (N, E, I), plus the experts' (E, I) bias
        if isinstance(ctx.raw(p[role]), QuantizedWeight):  # the stack's rows as one (E*I, H) MatMulNBits
            y = nbits.matmul(ctx, nbits.store(ctx, p[role], [p[role]]), flat, f"{node.name}/{role}", 0)
        else:
            y = b.op("MatMul", [flat, stacked_in(role)])
        y = b.op("Reshape", [y, b.const([-1, e, inter])])
        return b.op("Add", [y, ctx.weight_init(p[f"{role}_bias"])]) if f"{role}_bias" in p else y

    h = gated_unit(ctx, a, projected("experts.gate"), projected("experts.up"), node.name)  # (N, E, I)
    if isinstance(ctx.raw(p["experts.down"]), QuantizedWeight):
        # sum_e r_e * down_e(h_e) = [r_1 h_1 | … | r_E h_E] @ [down_1 | … | down_E]^T: one (H, E*I) MatMulNBits
        weighted = b.op("Reshape", [b.op("Mul", [h, b.op("Unsqueeze", [routing, b.const([2])])]),
                                    b.const([-1, e * inter])])
        stored = nbits.store(ctx, p["experts.down"], [p["experts.down"]], layout="experts_along_input")
        out = nbits.matmul(ctx, stored, weighted, f"{node.name}/experts.down", 0)
        if "experts.down_bias" in p:
            out = b.op("Add", [out, b.op("MatMul", [routing, ctx.weight_init(p["experts.down_bias"])])])
    else:
        down = ctx.weight_init(p["experts.down"], "T", lambda t: t.transpose(1, 2))  # (E, I, H)
        y = b.op("MatMul", [b.op("Transpose", [h], perm=[1, 0, 2]), down])  # (E, N, H)
        if "experts.down_bias" in p:
            y = b.op("Add", [y, ctx.weight_init(p["experts.down_bias"], "reshape", lambda t: t.unsqueeze(1))])
        y = b.op("MatMul", [b.op("Unsqueeze", [routing, b.const([1])]), b.op("Transpose", [y], perm=[1, 0, 2])])
        out = b.op("Reshape", [y, b.const([-1, hidden])])  # (N, H)
    if "shared.gate" in p:
        sg = activation(ctx, a["activation"], linear(ctx, flat, p["shared.gate"], None, f"{node.name}/shared.gate"),
                        f"{node.name}/shared.act")
        shared = linear(ctx, b.op("Mul", [sg, linear(ctx, flat, p["shared.up"], None, f"{node.name}/shared.up")]),
                        p["shared.down"], None, f"{node.name}/shared.down")
        if a.get("shared_gate"):
            gate_w = b.op("Sigmoid", [linear(ctx, flat, p["shared_gate"], None, f"{node.name}/shared_gate")])
            shared = b.op("Mul", [gate_w, shared])
        out = b.op("Add", [out, shared])
    return b.op("Reshape", [out, b.op("Shape", [x])], name=node.name)


def gated_unit(ctx: LowerContext, a: dict, gate: str, up: str, name: str) -> str:
    """The experts' hidden activation, as :func:`tokopt.optimizer.interpret.kernels.gated_unit` defines it."""
    b, glu = ctx.b, a.get("glu")
    if glu is None:
        return b.op("Mul", [activation(ctx, a["activation"], gate, f"{name}/act"), up])
    limit = b.const(float(glu["limit"]), "float32")
    g = b.op("Min", [gate, limit])
    u = b.op("Add", [b.op("Max", [b.op("Min", [up, limit]), b.op("Neg", [limit])]), b.const(1.0, "float32")])
    glu_out = b.op("Mul", [g, b.op("Sigmoid", [b.op("Mul", [g, b.const(float(glu["alpha"]), "float32")])])])
    return b.op("Mul", [u, glu_out], name=f"{name}/clamped_swiglu")
