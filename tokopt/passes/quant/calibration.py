"""Calibration for the quantize pass: run the model one block at a time and collect ``X^T X``.

GPTQ needs, for every Linear layer, the Gram matrix of its inputs on calibration text.
Capturing every layer's inputs at once scales with depth; instead the graph is cut into
segments (the embedding head, each ``layers.<i>.`` block, the tail) and the calibration
batches are pushed through one segment at a time, keeping only the values later
segments read (normally the residual stream).  Each segment is calibrated on the outputs
of the *already quantized* segments before it, so later layers learn to absorb earlier
layers' error — the sequential scheme of the GPTQ paper.  Memory stays one segment deep.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch

from tokopt.optimizer.interpret.kernels import StepContext, get_kernel
from tokopt.optimizer.ir.graph import Graph, Node, Value
from tokopt.optimizer.ir.weights import DenseWeights, Weight

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^layers\.(\d+)\.")


def split_segments(graph: Graph) -> list[list[Node]]:
    """Contiguous runs of the topological order that share a ``layers.<i>.`` prefix (or none)."""
    segments: list[list[Node]] = []
    last_key: object = object()
    for node in graph.nodes():
        m = _BLOCK.match(node.name)
        key = int(m.group(1)) if m else None
        if not segments or key != last_key:
            segments.append([])
            last_key = key
        segments[-1].append(node)
    return segments


class BlockwiseRunner:
    """Pushes calibration batches through ``graph`` one segment at a time, node by node.

    All batches advance together through each node, so a callback invoked *before* a
    node sees that node's inputs for every batch — enough to build a Hessian and swap in
    the quantized weight before the node runs (true-sequential GPTQ in one forward pass
    per block).  Weights are dequantized once and cached; :meth:`set_weight` replaces
    one.  A value is freed as soon as its last reader has run.
    """

    def __init__(self, graph: Graph, batches: list[torch.Tensor]) -> None:
        self.graph = graph
        self.batches = [b if b.dim() == 2 else b.unsqueeze(0) for b in batches]
        self.segments = split_segments(graph)
        order = [n for seg in self.segments for n in seg]
        self._inputs = {n.name: graph.inputs_of(n.name) for n in order}
        self._kernels = {n.name: get_kernel(n.op) for n in order}
        self._last_read: dict[Value, int] = {}
        for pos, node in enumerate(order):
            for value in self._inputs[node.name]:
                self._last_read[value] = pos
        self._pos = {n.name: pos for pos, n in enumerate(order)}
        self._envs: list[dict[Value, torch.Tensor]] = [{} for _ in self.batches]
        self.weight = DenseWeights(self.graph.params, torch.float32)
        self._ctxs = [StepContext(self.weight, torch.arange(b.shape[1]), b, None) for b in self.batches]

    def set_weight(self, name: str, value: Weight) -> None:
        self.weight.set(name, value)

    def input_value(self, node: str) -> Value:
        return self._inputs[node][0]

    @torch.inference_mode()
    def run(self, index: int, before: Callable[[Node], bool] | None = None) -> None:
        """Run segment ``index`` on every batch; ``before(node)`` may prepare a node, or return True to stop."""
        for node in self.segments[index]:
            if before is not None and before(node):
                return
            ins = self._inputs[node.name]
            out = Value(node.name, 0)
            pos = self._pos[node.name]
            for env, ctx in zip(self._envs, self._ctxs, strict=True):
                env[out] = self._kernels[node.name](node, [env[v] for v in ins], ctx)
                for v in (*ins, out):
                    if self._last_read.get(v, -1) <= pos:
                        env.pop(v, None)

    def hessian(self, value: Value) -> torch.Tensor:
        """Mean ``x x^T`` over every calibration token of ``value`` (which must be live)."""
        h: torch.Tensor | None = None
        n = 0
        for env in self._envs:
            flat = env[value].reshape(-1, env[value].shape[-1]).float()
            h = flat.T @ flat if h is None else h + flat.T @ flat
            n += flat.shape[0]
        return h / max(n, 1)
