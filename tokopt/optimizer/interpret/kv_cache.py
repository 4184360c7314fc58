"""The reference executor's KV cache: one store per attention layer, shaped by the IR.

Each layer keeps the absolute position of every cached slot, so masks (causal, window,
sinks) are computed from positions, not from slot indices.  That is what lets a bounded
cache, which evicts slots, share the attention kernel with the growing one.

The Attention node's attributes choose the store (see :class:`CachePolicy`):

- ``window``/``sinks``: a bounded cache of ``sinks`` sink slots plus a ring of ``window``
  slots; older tokens are evicted, so memory stops growing with the context;
- ``kv_cache.storage``: ``dynamic`` (tensors grow as tokens arrive), ``static`` (one buffer
  pre-allocated for ``max_len`` tokens — or ``sinks + window`` when bounded — written in
  place), or ``paged`` (fixed ``block_size`` pages allocated on demand, freed once evicted);
- ``kv_cache.layout``: ``BNSH`` (batch, kv heads, seq, head dim) or ``BSNH`` storage order.

Whatever the store, ``append(k, v, positions)`` takes this step's K/V in BNSH and the
``k``/``v``/``positions`` it leaves behind are what the step's queries may attend to:
BNSH views holding every retained token plus the new ones (for a multi-token chunk that
overflows the window, the view briefly holds the chunk too, because the chunk's first
queries need keys the ring is about to evict).  Keys are cached after RoPE at their
original absolute positions: that matches full recomputation (and transformers' sliding
window) exactly, with no re-rotation per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokopt.errors import KVCacheFullError, UnsupportedOpError
from tokopt.optimizer.ir.attrs import check_kv_storage


@dataclass(frozen=True)
class CachePolicy:
    """What one layer's cache must do, read from its Attention node's attributes."""

    window: int | None = None
    sinks: int = 0
    layout: str = "BNSH"
    storage: str = "dynamic"
    block_size: int | None = None
    max_len: int | None = None

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any] | None) -> CachePolicy:
        if not attrs:
            return cls()
        kv = attrs.get("kv_cache") or {}
        policy = cls(
            window=attrs.get("window") or None,
            sinks=int(attrs.get("sinks") or 0) if attrs.get("window") else 0,
            layout=kv.get("layout") or "BNSH",
            storage=kv.get("storage") or "dynamic",
            block_size=kv.get("block_size"),
            max_len=kv.get("max_len"),
        )
        problems = check_kv_storage(attrs)
        if problems:
            raise UnsupportedOpError(f"the reference KV cache cannot honour this layer: {'; '.join(problems)}")
        return policy

    @property
    def bounded(self) -> bool:
        return self.window is not None

    @property
    def capacity(self) -> int | None:
        """Slots one sequence can ever occupy (``None`` = unbounded)."""
        if self.window:
            return self.sinks + self.window
        return self.max_len


class _Store:
    """Shared plumbing: layout conversion and the attendable views left by ``append``."""

    def __init__(self, policy: CachePolicy) -> None:
        self.policy = policy
        self._seq_dim = 2 if policy.layout == "BNSH" else 1
        self._view: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # BNSH <-> storage layout (BSNH is a transpose of the head and sequence dims)
    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.policy.layout == "BNSH" else x.transpose(1, 2)

    def _load(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.policy.layout == "BNSH" else x.transpose(1, 2)

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._view is None else self._view[0]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._view is None else self._view[1]

    @property
    def positions(self) -> torch.Tensor | None:
        return None if self._view is None else self._view[2]

    def _keep(self, positions: torch.Tensor, latest: int) -> torch.Tensor:
        """Which cached positions a future query (at ``latest + 1`` or later) can still see."""
        window, sinks = self.policy.window, self.policy.sinks
        if window is None:
            return torch.ones_like(positions, dtype=torch.bool)
        return (positions > latest - window) | (positions < sinks)


class LayerCache(_Store):
    """``dynamic`` storage: tensors grow by concatenation; a window trims them back."""

    def __init__(self, policy: CachePolicy | None = None) -> None:
        super().__init__(policy or CachePolicy())
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        k, v = self._store(k), self._store(v)
        if self._k is not None:
            k = torch.cat([self._k, k], dim=self._seq_dim)
            v = torch.cat([self._v, v], dim=self._seq_dim)
            positions = torch.cat([self._pos, positions])
        self._view = (self._load(k), self._load(v), positions)
        keep = self._keep(positions, int(positions.max()))
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            k, v, positions = k.index_select(self._seq_dim, idx), v.index_select(self._seq_dim, idx), positions[idx]
        self._k, self._v, self._pos = k, v, positions

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._k, self._v) if t is not None)

    @property
    def tokens(self) -> int:
        return 0 if self._pos is None else int(self._pos.numel())


class StaticLayerCache(_Store):
    """``static`` storage: one buffer of ``capacity`` slots, allocated on the first append.

    Unbounded: slot = position; writing past ``max_len`` raises :class:`KVCacheFullError`.
    Bounded: slots ``[0, sinks)`` hold the sink tokens, the next ``window`` slots are a ring
    indexed by position.  Slots fill in order, so the occupied slots are always a prefix, and
    a slot's position is ``-1`` until it is written.

    ``fixed_shape=True`` is the compiled session's variant of the same store: a step that
    evicts nothing the step itself needs (every decode step) attends to the whole buffer
    (unwritten slots masked by their ``-1`` position), and nothing reads a device value on
    the host, so the step has one shape and one graph at every position.  The caller checks
    the capacity of an unbounded store before it appends (it knows how many tokens it has run).
    """

    def __init__(self, policy: CachePolicy, fixed_shape: bool = False) -> None:
        super().__init__(policy)
        self.capacity = int(policy.capacity)
        self.fixed_shape = fixed_shape
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Reserve the buffers now (a compiled step must not allocate them inside the graph)."""
        cap = self.capacity
        shape = (batch, heads, cap, head_dim) if self.policy.layout == "BNSH" else (batch, cap, heads, head_dim)
        self._k = torch.zeros(shape, dtype=dtype)
        self._v = torch.zeros(shape, dtype=dtype)
        self._pos = torch.full((cap,), -1, dtype=torch.long)

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        window, sinks = self.policy.window, self.policy.sinks
        if window is None:
            return positions.clone()
        return torch.where(positions < sinks, positions, sinks + (positions - sinks) % window)

    def _filled(self) -> int:
        return 0 if self._pos is None else int((self._pos >= 0).sum())

    def _write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        if self._k is None:
            self.allocate(k.shape[0], k.shape[1], k.shape[-1], k.dtype)
        elif k.shape[0] != self._k.shape[0]:
            raise UnsupportedOpError(
                f"this static KV cache was allocated for batch {self._k.shape[0]}, got batch {k.shape[0]}")
        if self.policy.window is None and not self.fixed_shape and int(positions.max()) >= self.capacity:
            raise KVCacheFullError(
                f"the static KV cache holds max_len={self.capacity} tokens and position {int(positions.max())} "
                "does not fit; raise kv-layout:max_len or use kv-layout:storage=dynamic")
        slots = self._slots(positions)
        if self.policy.window is not None and len(positions) > self.policy.window:
            keep = self._keep(positions, int(positions.max()))
            slots, positions = slots[keep], positions[keep]
            k, v = k[:, :, keep], v[:, :, keep]
        sd = self._seq_dim
        self._k.index_copy_(sd, slots, self._store(k))
        self._v.index_copy_(sd, slots, self._store(v))
        self._pos.index_copy_(0, slots, positions)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        # A token that lands in the ring evicts a key the chunk's earlier queries may need,
        # so a multi-token chunk that reaches the ring attends to old slots + the chunk.
        window = self.policy.window
        evicts = window is not None and len(positions) > 1 and int(positions.max()) >= self.policy.sinks + window
        if evicts and self._k is not None:
            n = self._filled()
            old_k = self._load(self._k.narrow(self._seq_dim, 0, n))
            old_v = self._load(self._v.narrow(self._seq_dim, 0, n))
            view = (torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2),
                    torch.cat([self._pos[:n], positions]))
            self._write(k, v, positions)
            self._view = view
            return
        if evicts:  # first chunk: nothing cached yet, so the chunk itself is the view
            self._write(k, v, positions)
            self._view = (k, v, positions)
            return
        self._write(k, v, positions)
        n = self.capacity if self.fixed_shape else self._filled()
        self._view = (self._load(self._k.narrow(self._seq_dim, 0, n)),
                      self._load(self._v.narrow(self._seq_dim, 0, n)), self._pos[:n])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._k, self._v) if t is not None)

    @property
    def tokens(self) -> int:
        return self._filled()


class PagedLayerCache(_Store):
    """``paged`` storage: pages of ``block_size`` tokens allocated as the sequence grows.

    Reserved memory is whole pages, so a batch of mixed lengths wastes less than a
    ``max_len`` reservation.  With a window, a page is freed once every token in it has
    left the window and none is a sink (eviction at page granularity; the mask hides the
    few stale tokens a kept page still holds).
    """

    def __init__(self, policy: CachePolicy) -> None:
        super().__init__(policy)
        self.block_size = int(policy.block_size)
        self._pages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (k, v, positions)
        self._used = 0  # tokens in the last page

    def _new_page(self, k: torch.Tensor, v: torch.Tensor) -> None:
        bsz, heads, _, dim = k.shape
        bs = self.block_size
        shape = (bsz, heads, bs, dim) if self.policy.layout == "BNSH" else (bsz, bs, heads, dim)
        self._pages.append((k.new_zeros(shape), v.new_zeros((*shape[:-1], v.shape[-1])),
                            torch.full((self.block_size,), -1, dtype=torch.long)))
        self._used = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        sd, done = self._seq_dim, 0
        while done < len(positions):
            if not self._pages or self._used == self.block_size:
                self._new_page(k, v)
            pk, pv, pp = self._pages[-1]
            n = min(self.block_size - self._used, len(positions) - done)
            pk.narrow(sd, self._used, n).copy_(self._store(k[:, :, done:done + n]))
            pv.narrow(sd, self._used, n).copy_(self._store(v[:, :, done:done + n]))
            pp[self._used:self._used + n] = positions[done:done + n]
            self._used += n
            done += n
        self._view = self._gather()
        if self.policy.window is not None:
            latest = int(positions.max())
            self._pages = [p for i, p in enumerate(self._pages)
                           if i == len(self._pages) - 1 or bool(self._keep(p[2][p[2] >= 0], latest).any())]

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ks, vs, ps = [], [], []
        for i, (pk, pv, pp) in enumerate(self._pages):
            n = self._used if i == len(self._pages) - 1 else self.block_size
            ks.append(self._load(pk.narrow(self._seq_dim, 0, n)))
            vs.append(self._load(pv.narrow(self._seq_dim, 0, n)))
            ps.append(pp[:n])
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2), torch.cat(ps)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pk, pv, _ in self._pages for t in (pk, pv))

    @property
    def tokens(self) -> int:
        return sum(int((pp >= 0).sum()) for _, _, pp in self._pages)


LayerStore = LayerCache | StaticLayerCache | PagedLayerCache


def make_layer_cache(policy: CachePolicy) -> LayerStore:
    if policy.storage == "static":
        return StaticLayerCache(policy)
    if policy.storage == "paged":
        return PagedLayerCache(policy)
    return LayerCache(policy)


@dataclass
class KVCache:
    """All layers' caches plus the number of tokens seen so far.

    A layer's store is created on first use from its Attention node's attributes, so the
    same cache object serves full, windowed, static and paged layers side by side.
    """

    layers: dict[str, LayerStore] = field(default_factory=dict)
    seen: int = 0
    #: how a layer's policy becomes a store (the compiled session pre-allocates fixed-shape static ones)
    make_store: Callable[[CachePolicy], LayerStore] = make_layer_cache

    def layer(self, name: str, attrs: dict[str, Any] | None = None) -> LayerStore:
        store = self.layers.get(name)
        if store is None:
            store = self.layers[name] = self.make_store(CachePolicy.from_attrs(attrs))
        return store

    def nbytes(self) -> int:
        """Bytes the cache has reserved (allocated buffers and pages, not transient views)."""
        return sum(store.nbytes for store in self.layers.values())

    def tokens(self) -> dict[str, int]:
        """Tokens each layer currently holds (bounded layers stop at sinks + window)."""
        return {name: store.tokens for name, store in self.layers.items()}
