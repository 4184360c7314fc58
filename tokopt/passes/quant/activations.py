"""Run-time activation quantization for the ``quantize`` pass: ``act_quant`` on the quantized Linears.

Each marked Linear quantizes its input per block of its weight's group at run time (the numerics are
:mod:`tokopt.optimizer.interpret.activations`, the schema :mod:`tokopt.optimizer.ir.attrs`).
"""

from __future__ import annotations

from tokopt.optimizer.ir.attrs import act_quant_attr
from tokopt.optimizer.ir.graph import Graph
from tokopt.passes.quant.weights import Target


def quantize_activations(g: Graph, targets: list[Target], bits: int) -> str:
    """Mark every quantized Linear to quantize its input per block of its weight's group."""
    blocks = set()
    linears = [g.node(n) for t in targets for n in t.nodes if g.node(n).op == "Linear"]
    for node in linears:
        block = g.params[node.params["weight"]].group_size
        node.attrs["act_quant"] = act_quant_attr(bits, block)
        blocks.add(block)
    return (f"activations: int{bits} per block of {'/'.join(map(str, sorted(blocks)))} "
            f"on {len(linears)} Linears")
