"""The fast torch session: the interpreter's kernels on pre-allocated KV buffers, a ``torch.compile``'d decode step.

The numbers are the interpreter's (:mod:`tokopt.optimizer.interpret`): this session runs the
same walk and the same kernels as the reference executor, so every attribute the reference
honours — window and sinks, int8/int4 KV, act_quant, quantized weights — is honoured here by
construction.  What it adds is speed:

- **KV buffers written in place** — every attention layer gets the reference's ``static`` store
  (:class:`~tokopt.optimizer.interpret.kv_cache.StaticLayerCache`) in its fixed-shape mode,
  holding K/V as its ``kv_cache.dtype`` stores them (int8/int4: codes + scales; KIVI's
  per-channel key blocks with its ring of full-precision slots, the block re-encoded branch-free
  inside the compiled step).  A ``static``
  layer pre-allocates its ``max_len`` slots (its ring of ``sinks + window`` when windowed); a
  ``dynamic`` one grows by blocks of :data:`GROWTH_BLOCK` tokens up to its ring, or up to the
  session's ``max_len`` when unbounded — so the memory follows the storage the IR names.  A
  ``paged`` layer is served the same way as a dynamic one (one buffer, not pages), which is why
  the ``torch-compile`` backend refuses ``paged``.  Slot positions live in a tensor, so masks
  come from positions as in the reference;
- **fixed shapes for decode** — one token per sequence, positions passed as a tensor and every
  decode step attending to the whole buffer, so the step compiles once (``torch.compile``,
  inductor) and is reused at every position, the ring's wrap-around included; a buffer that
  grows changes shape once per block, and after the first growth the compiled step takes the
  buffer length as a dynamic size.  Prefill runs the same walk eagerly, since prompt lengths
  vary.  When the decoder blocks are identical
  (:func:`~tokopt.backends.torch.regions.find_regions`), one block is compiled and called for
  every layer with that layer's weights and cache ("regional compilation");
- **low-bit weights on torch's low-bit kernels** where the IR's ``act_dtype`` says the Linear
  computes in bfloat16 (:mod:`tokopt.backends.torch.lowbit`); every other weight is
  **materialized once**.  RoPE's cos/sin are computed inside the step for its positions,
  so nothing caps a generation whose cache is bounded by a window: only unbounded layers limit
  the tokens a sequence may hold.

Its logits are checked against the reference in ``tests/test_torch_backend.py`` and
``tests/test_interpreter.py``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from tokopt.backends.torch.lowbit import LowBitWeights
from tokopt.backends.torch.regions import RegionWeights, find_regions, region_weights
from tokopt.errors import KVCacheFullError
from tokopt.optimizer.interpret.decode import GreedyGeneration
from tokopt.optimizer.interpret.interpreter import Interpreter, Lane
from tokopt.optimizer.interpret.kernels import StepContext
from tokopt.optimizer.interpret.kv_cache import CachePolicy, KVCache, StaticLayerCache
from tokopt.optimizer.ir.graph import Graph, Value
from tokopt.optimizer.ir.weights import DenseWeights

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 1024  # tokens an unbounded layer may hold when the model states no maximum
#: Slots a growing (dynamic) buffer adds at a time: one new shape, at most, per block of tokens.
GROWTH_BLOCK = 256
#: Inductor skips a cast that is undone right after (fp32 -> fp16 -> fp32) unless told to emulate it;
#: the KV cache's float16 scales are exactly such a cast, and skipping it changes the quantized codes.
COMPILE_OPTIONS = {"emulate_precision_casts": True}
#: Dynamo keeps compiled variants per *code object*, for the whole process: every session specializes the same
#: block on its weights' layouts and its batch sizes, so a process holding several sessions (``tokopt bench A B``,
#: the benchmarks) passes dynamo's default of 8 variants, after which it runs the block eagerly without a word
#: but a warning — a benchmark of five torch-compile artifacts did.  Raised, never lowered, when a session compiles
#: (``TOKOPT_RECOMPILE_LIMIT`` overrides it: the test suite, hundreds of short-lived sessions, keeps dynamo's 8).
RECOMPILE_LIMIT = 64


class CompiledSession(GreedyGeneration):
    """Same interface as the reference executor (``new_cache``/``forward``/``generate``).

    ``compile=False`` runs the pre-allocated-cache walk eagerly (useful to separate the
    effect of the cache from the effect of the compiler); ``max_len`` bounds the tokens one
    sequence can hold (prompt + generated).
    """

    def __init__(self, graph: Graph, compile: bool = True, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.graph = graph
        self.dtype = dtype
        self.max_len = int(max_len or graph.meta.max_positions or DEFAULT_MAX_LEN)
        self._weights = LowBitWeights(graph, DenseWeights(graph.params, dtype))
        self.interpreter = Interpreter(graph, self._weights)
        self._attention = [n for n in self.interpreter.order if n.op == "Attention"]
        # tokens one sequence may hold: what its unbounded layers hold (windowed layers never fill up)
        self._limit = min((self._store(CachePolicy.from_attrs(n.attrs)).capacity for n in self._attention
                           if not n.attrs.get("window")), default=None)
        self._regions = find_regions(self.interpreter, self._weights)
        self.compiled = compile
        self._decode = self._run
        if compile:
            dynamo = torch._dynamo.config
            limit = int(os.environ.get("TOKOPT_RECOMPILE_LIMIT", RECOMPILE_LIMIT))
            dynamo.recompile_limit = max(dynamo.recompile_limit, limit)
        if compile and self._regions:
            first = self._regions[0]
            self._entry = self.interpreter.inputs[self.interpreter.order[first[0]].name][0]
            self._region_weights = [region_weights(self.interpreter, self._weights, first, r) for r in self._regions]
            self._block_fn = torch.compile(self._block, dynamic=None, options=COMPILE_OPTIONS)
            self._decode = self._run_regional
        elif compile:  # dynamic=None: a growing buffer's length becomes a dynamic size after its first growth
            self._decode = torch.compile(self._run, dynamic=None, options=COMPILE_OPTIONS)
        log.info("compiled session: %s", "per-block (regional) torch.compile" if compile and self._regions
                 else "whole-graph torch.compile" if compile else "eager")

    # -- the cache ------------------------------------------------------------------------------
    def _store(self, policy: CachePolicy) -> StaticLayerCache:
        """A layer's buffer: all its static slots up front, else grown by blocks up to its ring or ``max_len``."""
        grows = policy.storage != "static"
        return StaticLayerCache(replace(policy, storage="static", max_len=policy.max_len or self.max_len),
                                fixed_shape=True, growth=GROWTH_BLOCK if grows else None)

    def new_cache(self, batch: int | None = None) -> KVCache:
        """An empty cache; its buffers are allocated for ``batch`` now, or on the first forward."""
        cache = KVCache(make_store=self._store)
        if batch is not None:
            self._allocate(cache, batch)
        return cache

    def _allocate(self, cache: KVCache, batch: int) -> None:
        with torch.inference_mode():
            for node in self._attention:
                a = node.attrs
                cache.layer(node.name, a).allocate(batch, a["num_kv_heads"], a["head_dim"], self.dtype)

    @property
    def linear_kernels(self) -> dict[str, int]:
        """Quantized Linears by the kernel that runs them (``dequantized``: held in float32 since load)."""
        return dict(self._weights.kernels)

    def kv_nbytes(self, cache: KVCache) -> int:
        """Bytes of the buffers ``cache`` holds now (an int8/int4 cache: its codes, scales and zeros)."""
        return cache.nbytes()

    # -- running ------------------------------------------------------------------------------
    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        lane = self.interpreter.lane(input_ids, cache, positions)
        self.interpreter.walk([lane])
        return lane.values[self.interpreter.logits]

    def _block(self, x: torch.Tensor, weights: RegionWeights, store: StaticLayerCache,
               positions: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The first decoder block's nodes, run with another block's weights and cache store."""
        start, end = self._regions[0]
        nodes = self.interpreter.order[start:end]
        cache = KVCache({self._attention[0].name: store})
        lane = Lane(StepContext(weights, positions, input_ids, cache))
        lane.values[self._entry] = x
        self.interpreter.walk([lane], nodes)
        return lane.values[Value(nodes[-1].name)]

    def _run_regional(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        interp = self.interpreter
        lane = interp.lane(input_ids, cache, positions)
        first, last = self._regions[0][0], self._regions[-1][1]
        interp.walk([lane], interp.order[:first])
        x = lane.values[self._entry]
        for r, (_, end) in enumerate(self._regions):
            store = cache.layers[self._attention[r].name]
            x = self._block_fn(x, self._region_weights[r], store, positions, input_ids)
            lane.values[Value(interp.order[end - 1].name)] = x
        interp.walk([lane], interp.order[last:])
        return lane.values[interp.logits]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for ``input_ids`` continuing ``cache`` (a fresh one if None)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        cache = cache if cache is not None else self.new_cache()
        bsz, seq = input_ids.shape
        if not cache.layers:
            self._allocate(cache, bsz)
        if self._limit is not None and cache.seen + seq > self._limit:
            raise KVCacheFullError(f"the compiled session's KV cache holds {self._limit} tokens; {cache.seen + seq} "
                                   "needed — load the artifact with a larger max_len (or raise kv-layout:max_len)")
        for store in cache.layers.values():
            store.reserve(cache.seen + seq)  # grow outside the compiled step
        positions = torch.arange(cache.seen, cache.seen + seq)
        # a fresh contiguous inference tensor: a strided slice, or a tensor made outside inference
        # mode, fails the compiled step's guards and would trigger a recompilation
        input_ids = input_ids.clone(memory_format=torch.contiguous_format)
        run = self._decode if seq == 1 else self._run
        logits = run(input_ids, positions, cache)
        cache.seen += seq
        return logits

__all__ = ["CompiledSession", "DEFAULT_MAX_LEN"]
