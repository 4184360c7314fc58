"""Lowerings of the elementwise, normalisation and embedding ops."""

from __future__ import annotations

from tokopt.backends.onnxruntime.lower import LowerContext
from tokopt.backends.onnxruntime.ops import register_lowering
from tokopt.errors import UnsupportedOpError
from tokopt.optimizer.ir.graph import Node, Value
from tokopt.optimizer.ir.weights import QuantizedWeight


@register_lowering("Input")
def lower_input(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    kind = node.attrs["kind"]
    if kind == "input_ids":
        return "input_ids"
    if kind == "position_ids":
        return ctx.position_ids()
    raise UnsupportedOpError(f"{node.name}: graph input kind {kind!r} has no ONNX lowering")


@register_lowering("Embedding")
def lower_embedding(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    from tokopt.backends.onnxruntime.ops import nbits

    param = node.params["weight"]
    if isinstance(ctx.raw(param), QuantizedWeight):
        stored = nbits.store(ctx, param, [param])
        return nbits.gather(ctx, stored, inputs[0], node.name, planes=nbits.reads_planes(ctx, param))
    return ctx.b.op("Gather", [ctx.weight_init(param), inputs[0]], axis=0, name=node.name)


def rms_norm(ctx: LowerContext, x: str, weight: str, eps: float, name: str) -> str:
    """RMSNorm over the last axis: the fused contrib kernel or five standard ops."""
    b = ctx.b
    if ctx.options.fused_norms:
        return b.op("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=float(eps), stash_type=1, name=name)
    mean = b.op("ReduceMean", [b.op("Mul", [x, x]), b.const([-1])], keepdims=1, name=f"{name}/mean")
    denom = b.op("Sqrt", [b.op("Add", [mean, b.const(eps, "float32")])])
    return b.op("Mul", [b.op("Div", [x, denom]), weight], name=name)


@register_lowering("RMSNorm")
def lower_rms_norm(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    return rms_norm(ctx, inputs[0], ctx.weight_init(node.params["weight"]), node.attrs["eps"], node.name)


@register_lowering("LayerNorm")
def lower_layer_norm(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    ins = [inputs[0], ctx.weight_init(node.params["weight"])]
    if "bias" in node.params:
        ins.append(ctx.weight_init(node.params["bias"]))
    return ctx.b.op("LayerNormalization", ins, axis=-1, epsilon=float(node.attrs["eps"]), name=node.name)


def activation(ctx: LowerContext, kind: str, x: str, name: str) -> str:
    b = ctx.b
    if kind == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x])], name=name)
    if kind == "gelu":
        return b.op("Gelu", [x], approximate="none", name=name)
    if kind == "gelu_tanh":
        return b.op("Gelu", [x], approximate="tanh", name=name)
    if kind == "relu":
        return b.op("Relu", [x], name=name)
    raise UnsupportedOpError(f"{name}: activation {kind!r} has no ONNX lowering")


@register_lowering("Activation")
def lower_activation(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    return activation(ctx, node.attrs["kind"], inputs[0], node.name)


@register_lowering("Scale")
def lower_scale(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    return ctx.b.op("Mul", [inputs[0], ctx.b.const(float(node.attrs["factor"]), "float32")], name=node.name)


def softcap(ctx: LowerContext, x: str, cap: float, name: str) -> str:
    """cap * tanh(x / cap), in the reference's order (divide, tanh, multiply)."""
    c = ctx.b.const(float(cap), "float32")
    return ctx.b.op("Mul", [ctx.b.op("Tanh", [ctx.b.op("Div", [x, c])]), c], name=name)


@register_lowering("Softcap")
def lower_softcap(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    return softcap(ctx, inputs[0], node.attrs["cap"], node.name)


@register_lowering("Mul")
def lower_mul(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    return ctx.b.op("Mul", inputs, name=node.name)


@register_lowering("Add")
def lower_add(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    """A residual add; fused with a following RMSNorm into SkipSimplifiedLayerNormalization."""
    norm = _following_rms_norm(ctx, node) if ctx.options.fused_norms else None
    if norm is None:
        return ctx.b.op("Add", inputs, name=node.name)
    weight = ctx.weight_init(norm.params["weight"])
    outs = [ctx.b.fresh(f"{norm.name}/out"), "", "", ctx.b.fresh(f"{node.name}/sum")]
    normed, _, _, total = ctx.b.ms("SkipSimplifiedLayerNormalization", [inputs[0], inputs[1], weight],
                                   outputs=outs, epsilon=float(norm.attrs["eps"]), name=f"{norm.name}/skip")
    ctx.bind(norm.name, normed)
    ctx.done.add(norm.name)
    return total


def _following_rms_norm(ctx: LowerContext, node: Node) -> Node | None:
    """The RMSNorm reading this Add's output, if any (at most one is fused)."""
    for dst, _slot in ctx.graph.users_of(Value(node.name, 0)):
        user = ctx.graph.node(dst)
        if user.op == "RMSNorm" and dst not in ctx.done:
            return user
    return None
