"""The one interpreter: a single walk over a graph's nodes that every torch executor shares.

Like ``torch.fx.Interpreter``, the walk — read a node's input values, call its registered
kernel (:mod:`tokopt.optimizer.interpret.kernels`), keep its output — is written once,
here.  The reference executor, healing, calibration and the compiled session differ only
in policy, which they pass in instead of copying the walk (copies drift):

- **weights**: any ``name -> tensor`` provider (dense dequantized weights, trainable
  parameters, one decoder block's weights under another block's names);
- **gradients**: ``grad=False`` runs :meth:`Interpreter.run` under ``torch.inference_mode``;
- **cache**: whatever the lane's :class:`StepContext` holds (a :class:`KVCache` whose stores
  are dynamic, static, paged or fixed-shape static), or none;
- **capture**: the first input of chosen nodes, kept per lane (calibration);
- **hooks**: ``before(node)`` runs before each node and may stop the walk;
- **node ranges**: ``walk(nodes=…)`` runs one segment; lanes carry values between segments;
- **lanes**: several batches advance together node by node, so a hook sees a node's inputs
  for all of them (true-sequential GPTQ);
- **freeing**: ``free=True`` drops each value once its last reader has run, but those in ``keep``;
- **exactness**: ``exact=False`` runs attention and norms through torch's fused float32 kernels
  (quality measurement only: ~1e-6 from the definition, see ``StepContext.exact``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from tokopt.optimizer.interpret.kernels import StepContext, get_kernel
from tokopt.optimizer.interpret.kv_cache import KVCache
from tokopt.optimizer.ir.graph import Graph, Node, Value

#: Runs before a node; returning True stops the walk there.
Hook = Callable[[Node], bool]


@dataclass
class Lane:
    """One batch's state in a walk: its step context, the values computed so far, the captured inputs."""

    ctx: StepContext
    values: dict[Value, torch.Tensor] = field(default_factory=dict)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)


class Interpreter:
    """Runs ``graph`` node by node with the registered kernels; every policy is a parameter.

    ``free=True`` drops a value after its last reader, except the values in ``keep`` (by
    default the graph's outputs, which nothing reads); a walk whose results a hook collects
    passes ``keep=()`` so that not even the logits outlive their node.
    """

    def __init__(self, graph: Graph, weights: Callable[[str], torch.Tensor], *, grad: bool = False,
                 free: bool = False, keep: Collection[Value] | None = None, exact: bool = True) -> None:
        self.graph = graph
        self.exact = exact
        self.weights = weights
        self.grad = grad
        self.order = graph.nodes()
        self.inputs = {n.name: graph.inputs_of(n.name) for n in self.order}
        self.kernels = {n.name: get_kernel(n.op) for n in self.order}  # an unknown op fails here, not mid-run
        self.logits = graph.outputs["logits"]
        self._last_read: dict[Value, int] | None = None
        self._index = {n.name: i for i, n in enumerate(self.order)}
        if free:
            self._last_read = {v: self._index[n.name] for n in self.order for v in self.inputs[n.name]}
            for v in graph.outputs.values() if keep is None else keep:
                self._last_read[v] = len(self.order)

    def lane(self, input_ids: torch.Tensor, cache: KVCache | None = None,
             positions: torch.Tensor | None = None) -> Lane:
        """A lane for ``input_ids`` (batch, seq); positions continue ``cache.seen`` unless given."""
        if positions is None:
            start = cache.seen if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1])
        return Lane(StepContext(self.weights, positions, input_ids, cache, exact=self.exact))

    def walk(self, lanes: Sequence[Lane], nodes: Sequence[Node] | None = None, before: Hook | None = None,
             capture: Collection[str] = ()) -> bool:
        """Run ``nodes`` (default: the whole graph) on every lane; False when ``before`` stopped the walk."""
        for node in self.order if nodes is None else nodes:
            if before is not None and before(node):
                return False
            reads, out, kernel = self.inputs[node.name], Value(node.name, 0), self.kernels[node.name]
            for lane in lanes:
                ins = [lane.values[v] for v in reads]
                if node.name in capture:
                    lane.captured[node.name] = ins[0]
                lane.values[out] = kernel(node, ins, lane.ctx)
                if self._last_read is not None:
                    here = self._index[node.name]
                    for v in (*reads, out):
                        if self._last_read.get(v, -1) <= here:
                            lane.values.pop(v, None)
        return True

    def run(self, input_ids: torch.Tensor, cache: KVCache | None = None,
            capture: Collection[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits of one forward on one lane, and the captured inputs; ``cache.seen`` advances."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        with torch.inference_mode(not self.grad):
            lane = self.lane(input_ids, cache)
            self.walk([lane], capture=capture)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        return lane.values[self.logits], lane.captured
