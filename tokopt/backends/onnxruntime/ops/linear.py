"""Linear layers: dense MatMul/Gemm, or ``com.microsoft::MatMulNBits`` for quantized weights.

Quantized weights are stored as the IR's codes and read by MatMulNBits (how, and why int8
runs as two 4-bit nibble planes, is :mod:`tokopt.backends.onnxruntime.ops.nbits`); a
quantized weight is never written dequantized.

A Linear with ``act_quant={"bits": 8, "block": group_size}`` on a MatMulNBits weight
lowers to ``accuracy_level=4`` (int8 activations per weight block: the same numbers,
see :mod:`tokopt.optimizer.interpret.activations`); any other ``act_quant`` becomes standard ops
that quantize the input exactly so (ReduceMax/Round/Mul) in front of the matmul,
so no backend that reuses this lowering (TensorRT too) can silently drop it.
"""

from __future__ import annotations

import numpy as np

from tokopt.backends.onnxruntime.lower import LowerContext
from tokopt.backends.onnxruntime.ops import nbits, register_lowering
from tokopt.optimizer.ir.graph import Node, Value
from tokopt.optimizer.ir.weights import QuantizedWeight


def quantize_activations(ctx: LowerContext, x: str, act_quant: dict, name: str) -> str:
    """Standard-op form of :func:`tokopt.optimizer.interpret.activations.quantize_activations`.

    ONNX ``Round`` is half-to-even, like ``torch.round``.
    """
    b = ctx.b
    block = act_quant["block"]
    shape = b.op("Shape", [x], name=f"{name}/act_shape")
    blocked = b.op("Reshape", [x, b.op("Concat", [b.op("Shape", [x], start=0, end=-1), b.const([-1, block])],
                                       axis=0)], name=f"{name}/act_blocks")
    amax = b.op("ReduceMax", [b.op("Abs", [blocked]), b.const([-1])], keepdims=1, name=f"{name}/act_absmax")
    scale = b.op("Div", [amax, b.const(float(2 ** (act_quant["bits"] - 1) - 1), "float32")])
    one = b.const(1.0, "float32")
    safe = b.op("Where", [b.op("Greater", [scale, b.const(0.0, "float32")]), scale, one])
    q = b.op("Mul", [b.op("Round", [b.op("Div", [blocked, safe])]), scale], name=f"{name}/act_quant")
    return b.op("Reshape", [q, shape], name=f"{name}/act_unblock")


def activation_input(ctx: LowerContext, x: str, act_quant: dict | None, w, name: str) -> tuple[str, int]:
    """(the matmul's input, MatMulNBits accuracy level) for a Linear's ``act_quant`` on weight ``w``."""
    if nbits.native_act_quant(act_quant, w):
        return x, 4
    if act_quant is not None:
        x = quantize_activations(ctx, x, act_quant, name)
    return x, 0


def linear(ctx: LowerContext, x: str, weight_param: str, bias_param: str | None, name: str,
           act_quant: dict | None = None) -> str:
    """``x @ W.T + b`` with ``x`` of any rank ≥ 2, its input quantized first as ``act_quant`` says."""
    b = ctx.b
    w = ctx.raw(weight_param)
    x, accuracy = activation_input(ctx, x, act_quant, w, name)
    if isinstance(w, QuantizedWeight):
        y = nbits.matmul(ctx, nbits.store(ctx, weight_param, [weight_param]), x, name, accuracy)
    elif ctx.is_shared(weight_param):
        # a tied embedding: keep one (V, H) copy and let Gemm read it transposed
        out_f, in_f = w.shape
        flat = b.op("Reshape", [x, b.const([-1, in_f])], name=f"{name}/flatten")
        y2 = b.op("Gemm", [flat, ctx.weight_init(weight_param)], transB=1, name=name)
        lead = b.op("Shape", [x], start=0, end=-1, name=f"{name}/lead")
        y = b.op("Reshape", [y2, b.op("Concat", [lead, b.const([out_f])], axis=0)], name=f"{name}/unflatten")
    else:
        y = b.op("MatMul", [x, ctx.weight_init(weight_param, "T", lambda t: t.t())], name=name)
    if bias_param is not None:
        y = b.op("Add", [y, ctx.weight_init(bias_param)], name=f"{name}/bias")
    return y


@register_lowering("Linear")
def lower_linear(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    if ctx.options.fuse_qkv and (group := qkv_group(ctx, node)) is not None:
        return lower_fused_qkv(ctx, group, inputs[0])[[p.name for p in group[1]].index(node.name)]
    if ctx.options.fuse_qkv and (siblings := sibling_group(ctx, node)) is not None:
        return lower_fused_siblings(ctx, siblings, inputs[0])[[n.name for n in siblings].index(node.name)]
    return linear(ctx, inputs[0], node.params["weight"], node.params.get("bias"), node.name,
                  node.attrs.get("act_quant"))


# -- fused QKV -----------------------------------------------------------------------------
def qkv_group(ctx: LowerContext, node: Node) -> tuple[Node, list[Node]] | None:
    """(attention, [q, k, v]) when ``node`` is one of three projections that can run as one matmul.

    They must read the same tensor, feed only their attention node, and store their
    weights alike (all dense, or all MatMulNBits-quantized with the same bits, block size
    and symmetry) and quantize their input alike, so that concatenating along the output
    axis changes no number.
    """
    users = ctx.graph.users_of(Value(node.name, 0))
    if len(users) != 1 or ctx.graph.node(users[0][0]).op != "Attention":
        return None
    attn = ctx.graph.node(users[0][0])
    producers = [ctx.graph.producer(v) for v in ctx.graph.inputs_of(attn.name)]
    if any(p.op != "Linear" or len(ctx.graph.users_of(Value(p.name, 0))) != 1 for p in producers):
        return None
    if len({ctx.graph.inputs_of(p.name)[0] for p in producers}) != 1 or len({p.name for p in producers}) != 3:
        return None
    keys = {_fusion_key(ctx, p) for p in producers}
    if len(keys) != 1 or None in keys:
        return None
    return attn, producers


def _storage_kind(w) -> tuple | None:
    if isinstance(w, QuantizedWeight):
        return None if nbits.storage_problem(w) else ("nbits", w.bits, w.group_size, w.symmetric)
    return ("dense",)


def fused_matmul(ctx: LowerContext, producers: list[Node], x: str, name: str) -> tuple[str, list[int]]:
    """One MatMul(NBits) computing several Linears of the same input, outputs concatenated; (output, widths).

    Weights (and biases) are concatenated along the output axis and each parameter records
    its rows/columns, so the ONNX frontend recovers every one of them exactly.
    """
    b = ctx.b
    params = [p.params["weight"] for p in producers]
    weights = [ctx.raw(p) for p in params]
    sizes = [w.shape[0] for w in weights]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    x, accuracy = activation_input(ctx, x, producers[0].attrs.get("act_quant"), weights[0], name)
    if isinstance(weights[0], QuantizedWeight):
        y = nbits.matmul(ctx, nbits.store(ctx, name, params), x, name, accuracy)
    else:
        fused = np.concatenate([ctx.dense(p).t().numpy() for p in params], axis=1)
        init = b.initializer(f"{name}.weight.T", fused)
        for p, w, off in zip(params, weights, offsets, strict=True):
            ctx.params[p] = {"kind": "dense", "init": init, "transform": "T", "cols": [off, off + w.shape[0]]}
        y = b.op("MatMul", [x, init], name=name)
    if "bias" in producers[0].params:
        bias = np.concatenate([ctx.dense(p.params["bias"]).numpy() for p in producers])
        y = b.op("Add", [y, b.initializer(f"{name}.bias", bias)], name=f"{name}/bias")
        for p, off, n in zip(producers, offsets, sizes, strict=True):
            ctx.params[p.params["bias"]] = {"kind": "dense", "init": f"{name}.bias", "transform": "",
                                            "cols": [off, off + n]}
    return y, sizes


def lower_fused_qkv(ctx: LowerContext, group: tuple[Node, list[Node]], x: str) -> list[str]:
    """One MatMul(NBits) for q, k and v; binds all three nodes (split, or packed for GQA)."""
    attn, producers = group
    b = ctx.b
    name = f"{attn.name}/qkv_proj"
    y, sizes = fused_matmul(ctx, producers, x, name)
    if ctx.attention_mode == "gqa" and not attn.attrs.get("qk_norm"):
        ctx.cache[("packed_qkv", attn.name)] = y  # GroupQueryAttention takes packed QKV itself
        parts = [y, y, y]
    else:
        parts = b.op("Split", [y, b.const(sizes)], axis=-1, outputs=3, name=f"{name}/split")
    _bind(ctx, producers, parts)
    return list(parts)


def _bind(ctx: LowerContext, producers: list[Node], parts: list[str]) -> None:
    for p, part in zip(producers, parts, strict=True):
        ctx.bind(p.name, part)
        ctx.done.add(p.name)


# -- fused siblings (an MLP's gate and up) ---------------------------------------------------
def sibling_group(ctx: LowerContext, node: Node) -> list[Node] | None:
    """Linears reading the same tensor as ``node`` that can run as one matmul, ``node`` among them.

    An MLP's gate and up projections are the case that matters: one MatMulNBits instead of
    two means one activation quantization and one kernel call less per layer and token.
    Same storage, bias presence and ``act_quant`` as for fused QKV; q/k/v go their own way.
    """
    x = ctx.graph.inputs_of(node.name)[0]
    key = _fusion_key(ctx, node)
    if key is None:
        return None
    group = [n for n in (ctx.graph.node(u) for u, _ in ctx.graph.users_of(x))
             if n.op == "Linear" and _fusion_key(ctx, n) == key]
    if len(group) < 2 or any(qkv_group(ctx, n) is not None for n in group):
        return None
    return sorted(group, key=lambda n: n.name)


def _fusion_key(ctx: LowerContext, node: Node) -> tuple | None:
    """Linears with equal keys can share one matmul: same storage, bias presence and ``act_quant``;
    None for a weight that cannot (shared with an embedding, or stored in no fusable form)."""
    param = node.params["weight"]
    if ctx.is_shared(param):
        return None
    kind = _storage_kind(ctx.raw(param))
    return None if kind is None else (kind, "bias" in node.params, repr(node.attrs.get("act_quant")))


def lower_fused_siblings(ctx: LowerContext, group: list[Node], x: str) -> list[str]:
    name = "+".join(n.name for n in group)
    y, sizes = fused_matmul(ctx, group, x, name)
    parts = ctx.b.op("Split", [y, ctx.b.const(sizes)], axis=-1, outputs=len(group), name=f"{name}/split")
    _bind(ctx, group, parts)
    return list(parts)
