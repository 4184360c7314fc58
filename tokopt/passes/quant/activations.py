"""Activation formats for the ``quantize`` pass: ``act_quant`` or ``act_dtype`` on the quantized Linears.

``act_quant``: each marked Linear quantizes its input per block of its weight's group at run time
(the numerics are :mod:`tokopt.optimizer.interpret.activations`); ``act_dtype``: it rounds its input
and product to bfloat16 (the schemas are :mod:`tokopt.optimizer.ir.attrs`).
"""

from __future__ import annotations

from tokopt.optimizer.ir.attrs import act_quant_attr
from tokopt.optimizer.ir.graph import Graph
from tokopt.passes.quant.weights import Target


def _quantized_linears(g: Graph, targets: list[Target]) -> list:
    return [g.node(n) for t in targets for n in t.nodes if g.node(n).op == "Linear"]


def quantize_activations(g: Graph, targets: list[Target], bits: int) -> str:
    """Mark every quantized Linear to quantize its input per block of its weight's group."""
    blocks = set()
    linears = _quantized_linears(g, targets)
    for node in linears:
        block = g.params[node.params["weight"]].group_size
        node.attrs["act_quant"] = act_quant_attr(bits, block)
        blocks.add(block)
    return (f"activations: int{bits} per block of {'/'.join(map(str, sorted(blocks)))} "
            f"on {len(linears)} Linears")


def round_activations(g: Graph, targets: list[Target], dtype: str) -> str:
    """Mark every quantized Linear to round its input and product to ``dtype``."""
    linears = _quantized_linears(g, targets)
    for node in linears:
        node.attrs["act_dtype"] = dtype
    return f"activations: {dtype} inputs and products on {len(linears)} Linears"
