"""The fast torch session: a static KV cache and a ``torch.compile``'d decode step.

The reference executor is written to be read; this session is written to be fast while
computing the same thing.  Three changes do the work:

- **static KV cache** — one pre-allocated ``(batch, kv_heads, max_len, head_dim)`` buffer
  per layer, written in place at each token's position (slot == position), instead of a
  concatenation per step.  Masks are built from positions exactly as in the reference
  (causal, window, sinks), so unwritten and out-of-window slots never contribute;
- **fixed shapes for decode** — one token per sequence, positions passed as a tensor, so
  the decode step compiles once (``torch.compile``, inductor) and is reused every step;
  prefill runs the same code eagerly, since prompt lengths vary.  When the decoder blocks
  are identical (:func:`find_regions`), only one block is compiled and it is called for
  every layer with that layer's weights and cache ("regional compilation": SmolLM2's 30
  layers compile in about a minute instead of several);
- **precomputed everything** — weights materialized once, RoPE tables for all ``max_len``
  positions, grouped-query attention as a batched matmul over the kv heads (no repeat of
  K/V).

Ops without a specialised kernel here (MoE, plugin ops) fall back to the reference
kernels, so any graph the reference can run, this session runs too.  Its logits are
checked against the reference in ``tests/test_torch_backend.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tokopt.errors import KVCacheFullError, UnsupportedOpError
from tokopt.optimizer.interpret.decode import greedy_decode
from tokopt.optimizer.interpret.kernels import (
    StepContext,
    attention_mask,
    get_kernel,
    linear,
    rms_norm,
    rope_key,
    rope_tables,
)
from tokopt.optimizer.interpret.kv_quant import quantize_kv
from tokopt.optimizer.ir.graph import Graph, Node
from tokopt.optimizer.ir.weights import DenseWeights

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 1024


@dataclass
class StaticKVCache:
    """Per-attention-layer K/V buffers of ``max_len`` slots; ``seen`` tokens written so far."""

    max_len: int
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@dataclass
class _Step:
    """One node of the straight-line program: how to compute it and where its inputs are."""

    fn: Callable[..., torch.Tensor]
    node: Node
    inputs: list[int]
    weights: dict[str, torch.Tensor]
    layer: int = -1  # index into the cache lists for Attention nodes


class CompiledSession:
    """Same interface as the reference executor (``new_cache``/``forward``/``generate``).

    ``compile=False`` runs the static-cache program eagerly (useful to separate the
    effect of the cache from the effect of the compiler); ``max_len`` bounds the tokens one
    sequence can hold (prompt + generated).
    """

    def __init__(self, graph: Graph, compile: bool = True, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.graph = graph
        self.dtype = dtype
        cap = graph.meta.max_positions or DEFAULT_MAX_LEN
        self.max_len = int(max_len or min(cap, DEFAULT_MAX_LEN))
        self._attention: list[Node] = []
        self._program = self._build(graph)
        self._logits_index = self._index[graph.outputs["logits"].node]
        self._slots = torch.arange(self.max_len)
        self.compiled = compile
        self._regions = find_regions(self._program, self._logits_index)
        self._decode = self._run
        if compile and self._regions:
            # regional compilation: the decoder block is compiled once and reused for every layer
            self._region_weights = [[step.weights for step in self._program[s:e]] for s, e in self._regions]
            self._block_fn = torch.compile(self._block, dynamic=False)
            self._decode = self._run_regional
        elif compile:
            self._decode = torch.compile(self._run, dynamic=False)
        log.info("compiled session: %s", "per-block (regional) torch.compile" if compile and self._regions
                 else "whole-graph torch.compile" if compile else "eager")

    # -- building the program --------------------------------------------------------------
    def _build(self, graph: Graph) -> list[_Step]:
        self._weight = DenseWeights(graph.params, self.dtype)
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        order = graph.nodes()
        self._index = {n.name: i for i, n in enumerate(order)}
        program = []
        for node in order:
            ins = [self._index[v.node] for v in graph.inputs_of(node.name)]
            if any(v.slot for v in graph.inputs_of(node.name)):
                raise UnsupportedOpError(
                    f"{node.name}: multi-output producers are not supported by the compiled session")
            weights = {role: self._weight(p) for role, p in node.params.items()}
            fn = _FAST.get(node.op)
            step = _Step(fn or _fallback(get_kernel(node.op)), node, ins, weights)
            if node.op == "Attention":
                step.layer = len(self._attention)
                self._attention.append(node)
                step.weights["__rope__"] = self._rope_tables(node)
            program.append(step)
        return program

    def _rope_tables(self, node: Node) -> Any:
        rope = node.attrs.get("rope")
        if not rope:
            return None
        key = rope_key(rope)
        if key not in self._rope:  # layers with the same RoPE share one max_len table
            self._rope[key] = rope_tables(rope, torch.arange(self.max_len), self.dtype)
        return self._rope[key]

    # -- running ------------------------------------------------------------------------------
    def new_cache(self, batch: int | None = None) -> StaticKVCache:
        """An empty cache; its buffers are allocated for ``batch`` now, or on the first forward."""
        cache = StaticKVCache(self.max_len)
        if batch is not None:
            with torch.inference_mode():
                self._allocate(cache, batch)
        return cache

    def _allocate(self, cache: StaticKVCache, batch: int) -> None:
        for node in self._attention:
            shape = (batch, node.attrs["num_kv_heads"], self.max_len, node.attrs["head_dim"])
            cache.k.append(torch.zeros(shape, dtype=self.dtype))
            cache.v.append(torch.zeros(shape, dtype=self.dtype))

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor,
             cache_k: list[torch.Tensor], cache_v: list[torch.Tensor]) -> torch.Tensor:
        env = _Env(input_ids, positions, self._slots, cache_k, cache_v)
        values: list[torch.Tensor | None] = [None] * len(self._program)
        for i, step in enumerate(self._program):
            values[i] = step.fn(step, [values[j] for j in step.inputs], env, step.weights)
        return values[self._logits_index]

    def _block(self, x: torch.Tensor, weights: list[dict[str, Any]], cache_k: torch.Tensor, cache_v: torch.Tensor,
               positions: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """One decoder block, run with the first block's steps and the given block's weights and cache."""
        start, end = self._regions[0]
        entry = self._program[start].inputs[0]
        env = _Env(input_ids, positions, self._slots, [cache_k], [cache_v])
        vals: dict[int, torch.Tensor] = {}
        for j in range(start, end):
            step = self._program[j]
            vals[j] = step.fn(step, [x if src == entry else vals[src] for src in step.inputs], env, weights[j - start])
        return vals[end - 1]

    def _run_regional(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      cache_k: list[torch.Tensor], cache_v: list[torch.Tensor]) -> torch.Tensor:
        env = _Env(input_ids, positions, self._slots, cache_k, cache_v)
        prog = self._program
        values: list[torch.Tensor | None] = [None] * len(prog)
        first, last = self._regions[0][0], self._regions[-1][1]
        for i in range(first):
            values[i] = prog[i].fn(prog[i], [values[j] for j in prog[i].inputs], env, prog[i].weights)
        x = values[prog[first].inputs[0]]
        for r, (_, end) in enumerate(self._regions):
            x = self._block_fn(x, self._region_weights[r], cache_k[r], cache_v[r], positions, input_ids)
            values[end - 1] = x
        for i in range(last, len(prog)):
            values[i] = prog[i].fn(prog[i], [values[j] for j in prog[i].inputs], env, prog[i].weights)
        return values[self._logits_index]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: StaticKVCache | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for ``input_ids`` continuing ``cache`` (a fresh one if None)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        cache = cache if cache is not None else self.new_cache()
        bsz, seq = input_ids.shape
        if not cache.k:
            self._allocate(cache, bsz)
        elif cache.k[0].shape[0] != bsz:
            raise ValueError(f"this cache holds batch {cache.k[0].shape[0]}, got input batch {bsz}")
        if cache.seen + seq > self.max_len:
            raise KVCacheFullError(f"the compiled session's static KV cache holds {self.max_len} tokens; "
                                   f"{cache.seen + seq} needed — load the artifact with a larger max_len")
        positions = torch.arange(cache.seen, cache.seen + seq)
        # a fresh contiguous inference tensor: a strided slice, or a tensor made outside inference
        # mode, fails the compiled step's guards and would trigger a recompilation
        input_ids = input_ids.clone(memory_format=torch.contiguous_format)
        run = self._decode if seq == 1 else self._run
        logits = run(input_ids, positions, cache.k, cache.v)
        cache.seen += seq
        return logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor:
        """Greedy decoding; returns (batch, new_tokens) ids (stops when every row hit EOS)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        return greedy_decode(self.forward, self.new_cache(), input_ids, max_new_tokens, eos_token_id)


NORMS = ("RMSNorm", "LayerNorm")


def find_regions(program: list[_Step], logits_index: int) -> list[tuple[int, int]] | None:
    """Program ranges ``[start, end)`` of the decoder blocks, if they are identical and self-contained.

    A block starts at the norm feeding an attention's query projection and ends before the
    next block's (or the final) norm.  It qualifies for regional compilation when it reads
    nothing from outside but its entry value, nothing outside reads its insides, and every
    block has the same ops, attributes (but ``layer_index``) and weight shapes as the first.
    ``None`` means "compile the whole graph instead".
    """
    starts = []
    for step in program:
        if step.node.op != "Attention":
            continue
        q = program[step.inputs[0]]
        if not q.inputs or program[q.inputs[0]].node.op not in NORMS:
            return None
        starts.append(q.inputs[0])
    head = program[logits_index]
    if len(starts) < 2 or head.node.op != "Linear" or not head.inputs or program[head.inputs[0]].node.op not in NORMS:
        return None
    bounds = [*starts, head.inputs[0]]
    if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
        return None
    regions = list(zip(bounds[:-1], bounds[1:], strict=True))
    inside: dict[int, int] = {}
    for r, (start, end) in enumerate(regions):
        entry = program[start].inputs[0]
        if entry >= start or program[end].inputs[0] != end - 1:
            return None
        for j in range(start, end):
            inside[j] = r
            if any(not (start <= src < j or src == entry) for src in program[j].inputs):
                return None
    for j, step in enumerate(program):
        for src in step.inputs:
            r = inside.get(src)
            if r is not None and inside.get(j) != r and src != regions[r][1] - 1:
                return None
    first = _signature(program, *regions[0])
    if any(_signature(program, s, e) != first for s, e in regions[1:]):
        return None
    return regions


def _signature(program: list[_Step], start: int, end: int) -> list[Any]:
    entry = program[start].inputs[0]
    sig = []
    for j in range(start, end):
        step = program[j]
        attrs = {k: v for k, v in step.node.attrs.items() if k != "layer_index"}
        weights = sorted((role, tuple(t.shape), t.dtype) for role, t in step.weights.items()
                         if isinstance(t, torch.Tensor))
        sig.append((step.node.op, repr(attrs), tuple(-1 if s == entry else s - start for s in step.inputs), weights))
    return sig


@dataclass
class _Env:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    cache_k: list[torch.Tensor]
    cache_v: list[torch.Tensor]


# -- kernels of the static program (same numerics as tokopt/backends/torch/kernels.py) ------------
def _input(step: _Step, ins: list[torch.Tensor], env: _Env, w: dict) -> torch.Tensor:
    kind = step.node.attrs["kind"]
    if kind == "input_ids":
        return env.input_ids
    if kind == "position_ids":
        return env.positions.unsqueeze(0).expand(env.input_ids.shape[0], -1)
    raise UnsupportedOpError(f"unknown graph input kind {kind!r}")


def _embedding(step: _Step, ins: list[torch.Tensor], env: _Env, w: dict) -> torch.Tensor:
    return F.embedding(ins[0], w["weight"])


def _rms(step: _Step, ins: list[torch.Tensor], env: _Env, w: dict) -> torch.Tensor:
    return rms_norm(ins[0], w["weight"], step.node.attrs["eps"])


def _layer_norm(step: _Step, ins: list[torch.Tensor], env: _Env, w: dict) -> torch.Tensor:
    return F.layer_norm(ins[0], w["weight"].shape, w["weight"], w.get("bias"), step.node.attrs["eps"])


def _linear(step: _Step, ins: list[torch.Tensor], env: _Env, w: dict) -> torch.Tensor:
    return linear(ins[0], w["weight"], w.get("bias"), step.node.attrs.get("act_quant"))


def _add(step: _Step, ins: list[torch.Tensor], env: _Env, w: dict) -> torch.Tensor:
    return ins[0] + ins[1]


def _mul(step: _Step, ins: list[torch.Tensor], env: _Env, w: dict) -> torch.Tensor:
    return ins[0] * ins[1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rd = cos.shape[-1]
    xr, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, rest], dim=-1)


def _attention(step: _Step, ins: list[torch.Tensor], env: _Env, w: dict) -> torch.Tensor:
    a = step.node.attrs
    q, k, v = ins
    bsz, seq, _ = q.shape
    h, kvh, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    group = h // kvh
    q = q.view(bsz, seq, h, d).transpose(1, 2)
    k = k.view(bsz, seq, kvh, d).transpose(1, 2)
    v = v.view(bsz, seq, kvh, d).transpose(1, 2)
    if a.get("qk_norm"):
        q = rms_norm(q, w["q_norm"], a["qk_norm"]["eps"])
        k = rms_norm(k, w["k_norm"], a["qk_norm"]["eps"])
    rope = w["__rope__"]
    if rope is not None:
        cos, sin = rope[0][env.positions], rope[1][env.positions]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = quantize_kv(k, v, a["kv_cache"])
    cache_k, cache_v = env.cache_k[step.layer], env.cache_v[step.layer]
    cache_k.index_copy_(2, env.positions, k)
    cache_v.index_copy_(2, env.positions, v)
    # grouped-query attention without repeating K/V: fold each kv head's query group into rows
    qg = q.reshape(bsz, kvh, group * seq, d)
    scores = (qg @ cache_k.transpose(-1, -2)) * a["scale"]
    if a.get("softcap"):
        scores = torch.tanh(scores / a["softcap"]) * a["softcap"]
    mask = attention_mask(env.positions, env.slots, a).repeat(group, 1)  # (group*seq, max_len)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = (probs @ cache_v).view(bsz, h, seq, d)
    return out.transpose(1, 2).reshape(bsz, seq, h * d)


def _fallback(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a reference kernel (MoE, activations, plugin ops) inside the static program."""

    def run(step: _Step, ins: list[torch.Tensor], env: _Env, w: dict) -> torch.Tensor:
        by_name = {pname: w[role] for role, pname in step.node.params.items()}
        ctx = StepContext(by_name.__getitem__, env.positions, env.input_ids, None)
        return kernel(step.node, ins, ctx)

    return run


_FAST: dict[str, Callable[..., torch.Tensor]] = {
    "Input": _input, "Embedding": _embedding, "RMSNorm": _rms, "LayerNorm": _layer_norm, "Linear": _linear,
    "Add": _add, "Mul": _mul, "Attention": _attention,
}

__all__ = ["CompiledSession", "StaticKVCache", "DEFAULT_MAX_LEN"]
