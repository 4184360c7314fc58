"""The reference executor: the interpreter's eager, inference-mode policy.

It is the oracle: frontends prove themselves against transformers through it, and
every backend and pass is checked against it.  Quantized weights are dequantized
exactly once and then used as dense tensors, so quantization error is the format's,
never the executor's.  The walk itself is :class:`~tokopt.optimizer.interpret.interpreter.Interpreter`'s.
"""

from __future__ import annotations

import torch

from tokopt.optimizer.interpret.decode import GreedyGeneration
from tokopt.optimizer.interpret.interpreter import Interpreter
from tokopt.optimizer.interpret.kv_cache import KVCache
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import DenseWeights


class ReferenceExecutor(GreedyGeneration):
    def __init__(self, graph: Graph, dtype: torch.dtype = torch.float32, weights: DenseWeights | None = None,
                 exact: bool = True) -> None:
        """``weights``: another executor's, to share (two runs of one graph need one copy of its weights).

        ``exact=False``: attention and norms through torch's fused float32 kernels, ~1e-6 from the
        float64 definition — for measuring quality, never for parity (see ``StepContext.exact``).
        """
        self.graph = graph
        self.dtype = dtype
        self.weight = weights if weights is not None else DenseWeights(graph.params, dtype)
        self.interpreter = Interpreter(graph, self.weight, exact=exact)

    def new_cache(self, batch: int | None = None) -> KVCache:
        """A growing cache (its stores take whatever batch the first forward brings)."""
        return KVCache()

    def kv_nbytes(self, cache: KVCache) -> int:
        """Bytes of the buffers and pages ``cache`` holds now (an int8/int4 cache: its codes, scales and zeros)."""
        return cache.nbytes()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                capture: set[str] | None = None) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (batch, seq, vocab) for ``input_ids`` (batch, seq) continuing ``cache``.

        With ``capture``, also returns the inputs of the named nodes (for calibration).
        """
        logits, captured = self.interpreter.run(input_ids, cache, capture or ())
        return (logits, captured) if capture is not None else logits

