"""The reference executor: runs the IR node by node in eager torch.

It is the oracle: frontends prove themselves against transformers through it, and
every backend and pass is checked against it.  Quantized weights are dequantized
exactly once and then used as dense tensors, so quantization error is the format's,
never the executor's.
"""

from __future__ import annotations

import torch

from tokopt.optimizer.interpret.decode import greedy_decode
from tokopt.optimizer.interpret.kernels import StepContext, get_kernel
from tokopt.optimizer.interpret.kv_cache import KVCache
from tokopt.optimizer.ir.graph import Graph, Value
from tokopt.optimizer.ir.weights import DenseWeights


class ReferenceExecutor:
    def __init__(self, graph: Graph, dtype: torch.dtype = torch.float32) -> None:
        self.graph = graph
        self.dtype = dtype
        self._order = graph.nodes()
        self._inputs = {n.name: graph.inputs_of(n.name) for n in self._order}
        self._kernels = {n.name: get_kernel(n.op) for n in self._order}
        self.weight = DenseWeights(graph.params, dtype)

    def new_cache(self) -> KVCache:
        return KVCache()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                capture: set[str] | None = None) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (batch, seq, vocab) for ``input_ids`` (batch, seq) continuing ``cache``.

        With ``capture``, also returns the inputs of the named nodes (for calibration).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        start = cache.seen if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1])
        ctx = StepContext(self.weight, positions, input_ids, cache)
        values: dict[Value, torch.Tensor] = {}
        captured: dict[str, torch.Tensor] = {}
        for node in self._order:
            ins = [values[v] for v in self._inputs[node.name]]
            if capture and node.name in capture:
                captured[node.name] = ins[0]
            values[Value(node.name, 0)] = self._kernels[node.name](node, ins, ctx)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        logits = values[self.graph.outputs["logits"]]
        return (logits, captured) if capture is not None else logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor:
        """Greedy decoding with the KV cache; returns (batch, new_tokens) ids."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        return greedy_decode(self.forward, self.new_cache(), input_ids, max_new_tokens, eos_token_id)
