"""Decoder blocks that can share one compiled graph ("regional compilation").

Compiling one decoder block and calling it for every layer with that layer's weights and
cache costs one compilation instead of one per layer (SmolLM2's 30 layers compile in about
a minute instead of several).  That is only sound when the blocks are identical and
self-contained, which :func:`find_regions` checks on the interpreter's node order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokopt.optimizer.interpret.interpreter import Interpreter

NORMS = ("RMSNorm", "LayerNorm")


def find_regions(interp: Interpreter, weights: Callable[[str], torch.Tensor]) -> list[tuple[int, int]] | None:
    """Node-order ranges ``[start, end)`` of the decoder blocks, if they are identical and self-contained.

    A block starts at the norm feeding an attention's query projection and ends before the
    next block's (or the final) norm.  It qualifies when it reads nothing from outside but
    its entry value, nothing outside reads its insides but its last value, and every block
    has the same ops, attributes (but ``layer_index``) and weight shapes as the first.
    ``None`` means "compile the whole graph instead".
    """
    order = interp.order
    index = {n.name: i for i, n in enumerate(order)}
    inputs = [[index[v.node] for v in interp.inputs[n.name]] for n in order]
    starts = []
    for i, node in enumerate(order):
        if node.op != "Attention":
            continue
        q = inputs[i][0]
        if not inputs[q] or order[inputs[q][0]].op not in NORMS:
            return None
        starts.append(inputs[q][0])
    head = index[interp.logits.node]
    if len(starts) < 2 or order[head].op != "Linear" or not inputs[head] or order[inputs[head][0]].op not in NORMS:
        return None
    bounds = [*starts, inputs[head][0]]
    if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
        return None
    regions = list(zip(bounds[:-1], bounds[1:], strict=True))
    inside: dict[int, int] = {}
    for r, (start, end) in enumerate(regions):
        entry = inputs[start][0]
        if entry >= start or inputs[end][0] != end - 1:
            return None
        for j in range(start, end):
            inside[j] = r
            if any(not (start <= src < j or src == entry) for src in inputs[j]):
                return None
    for j in range(len(order)):
        for src in inputs[j]:
            r = inside.get(src)
            if r is not None and inside.get(j) != r and src != regions[r][1] - 1:
                return None
    first = _signature(interp, inputs, weights, *regions[0])
    if any(_signature(interp, inputs, weights, s, e) != first for s, e in regions[1:]):
        return None
    return regions


def _signature(interp: Interpreter, inputs: list[list[int]], weights: Callable[[str], torch.Tensor],
               start: int, end: int) -> list[Any]:
    entry = inputs[start][0]
    sig = []
    for j in range(start, end):
        node = interp.order[j]
        attrs = {k: v for k, v in node.attrs.items() if k != "layer_index"}
        shapes = sorted((role, tuple(weights(p).shape), _layout(weights(p))) for role, p in node.params.items())
        sig.append((node.op, repr(attrs), tuple(-1 if s == entry else s - start for s in inputs[j]), shapes))
    return sig


def _layout(w: Any) -> Any:
    """What a block's compiled code specializes on besides the shape: a dense weight's dtype, a low-bit one's
    kernel, bits, group and formats (:mod:`tokopt.backends.torch.lowbit`)."""
    return w.layout if hasattr(w, "layout") else w.dtype


class RegionWeights(dict):
    """One block's weights under the first block's parameter names: the weight provider its walk reads.

    Kept for the session's lifetime and called directly (not through a fresh bound method),
    so a compiled frame that guards on the provider — one resumed after a graph break, in an
    MoE kernel — finds the same object at every step.
    """

    def __call__(self, name: str) -> torch.Tensor:
        return self[name]


def region_weights(interp: Interpreter, weights: Callable[[str], torch.Tensor], first: tuple[int, int],
                   region: tuple[int, int]) -> RegionWeights:
    """``region``'s weights under the first region's parameter names, so the first block's nodes run it."""
    pairs = zip(interp.order[first[0]:first[1]], interp.order[region[0]:region[1]], strict=True)
    return RegionWeights({ours.params[role]: weights(theirs.params[role]) for ours, theirs in pairs
                          for role in ours.params})
