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
- ``kv_cache.layout``: ``BNSH`` (batch, kv heads, seq, head dim) or ``BSNH`` storage order;
- ``kv_cache.dtype``: float K/V stored as such, or int8/int4 stored as integer codes plus
  scales (:class:`~tokopt.optimizer.interpret.kv_quant.IntKVCodec`) and dequantized on read.
  A store keeps *planes* — K's encoded tensors, then V's — each (batch, heads, seq, width)
  in the storage layout, so slicing, copying and eviction are the same for every dtype.
  A KIVI cache (``kv_cache.quant.key_axis == "channel"``) adds a :class:`KiviResidual` ring of
  full-precision slots, rewrites a key block's rows once it is read quantized, and its view
  holds the dequantized slots then the full-precision ones, flagged by ``quantized`` for the
  attention mask.  It refuses sliding windows (a ring would evict tokens out of a key block).

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
from tokopt.optimizer.interpret.kv_quant import FLOAT_KV, KiviKVCodec, KVCodec, kv_codec
from tokopt.optimizer.ir.attrs import check_kv_storage, kivi_quantized_below


@dataclass(frozen=True)
class CachePolicy:
    """What one layer's cache must do, read from its Attention node's attributes."""

    window: int | None = None
    sinks: int = 0
    layout: str = "BNSH"
    storage: str = "dynamic"
    block_size: int | None = None
    max_len: int | None = None
    codec: KVCodec = FLOAT_KV  # how K/V are stored: as floats, or as integer codes + scales

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
            codec=kv_codec(kv),
        )
        problems = check_kv_storage(attrs)
        if isinstance(policy.codec, KiviKVCodec) and policy.window:
            problems.append(f"a KIVI cache (key_axis='channel') with window={policy.window}: the ring would evict "
                            "tokens out of the per-channel key blocks; use key_axis='token' on windowed layers")
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


class KiviResidual:
    """A KIVI cache's full-precision side: a ring of ``residual + token_group`` K/V slots per sequence.

    The store keeps one row per token of quantized planes (K rows are placeholders until their block
    is encoded); this ring keeps the newest tokens as they came, slot = position mod ring size.  Each
    step, :meth:`step` writes the step's tokens, encodes the K blocks the read rule
    (:func:`~tokopt.optimizer.ir.attrs.kivi_quantized_below`) now reads quantized from their
    full-precision copies, hands them to the store's ``rewrite`` and returns the full-precision K/V and
    positions the step may read.  ``fixed_shape`` (the compiled session's one-token step) reads no
    device value on the host: every step re-encodes the block holding position ``t - R`` (complete
    exactly when the read rule first reads it; until then its rows are never read, so re-encoding a
    partial block is harmless).
    """

    def __init__(self, codec: KiviKVCodec) -> None:
        self.codec = codec
        self.slots = codec.ring_slots
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.k = torch.zeros((batch, heads, self.slots, head_dim), dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((self.slots,), -1, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def step(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
             rewrite: Callable[[list[torch.Tensor], torch.Tensor], None], fixed_shape: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.allocate(k.shape[0], k.shape[1], k.shape[-1], k.dtype)
        size, g, r = self.slots, self.codec.token_group, self.codec.residual
        if fixed_shape and len(positions) == 1:
            slot = positions % size
            self.k.index_copy_(2, slot, k)
            self.v.index_copy_(2, slot, v)
            self.pos.index_copy_(0, slot, positions)
            start = (positions - r).clamp(min=0) // g * g
            block = start + torch.arange(g)
            rewrite(self.codec.encode_keys(self.k.index_select(2, block % size)), block)
            return self.k, self.v, self.pos
        first, last = int(positions[0]), int(positions.max())
        k_all, v_all = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        pos_all = torch.cat([self.pos, positions])
        before, now = kivi_quantized_below(first - 1, g, r), kivi_quantized_below(last, g, r)
        if now > before:  # blocks read quantized from this step on: encode them from their full-precision rows
            need = torch.arange(before, now)
            rows = torch.where(need >= first, size + need - first, need % size)
            rewrite(self.codec.encode_keys(k_all.index_select(2, rows)), need)
        tail = positions[-size:]
        self.k.index_copy_(2, tail % size, k[:, :, -size:])
        self.v.index_copy_(2, tail % size, v[:, :, -size:])
        self.pos.index_copy_(0, tail % size, tail)
        return k_all, v_all, pos_all


class _Store:
    """Shared plumbing: layout conversion, encoding K/V into planes, and the attendable views left by ``append``."""

    def __init__(self, policy: CachePolicy) -> None:
        self.policy = policy
        self._seq_dim = 2 if policy.layout == "BNSH" else 1
        self._view: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        codec = policy.codec
        self._residual = KiviResidual(codec) if isinstance(codec, KiviKVCodec) else None
        self._fp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # BNSH <-> storage layout (BSNH is a transpose of the head and sequence dims)
    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.policy.layout == "BNSH" else x.transpose(1, 2)

    def _load(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.policy.layout == "BNSH" else x.transpose(1, 2)

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """This step's K and V (BNSH) as the planes the store keeps: K's, then V's (still BNSH)."""
        return self.policy.codec.encode_kv(k, v)

    def _kivi(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, fixed_shape: bool = False) -> None:
        """A KIVI store, after writing the step's rows: the full-precision ring's step (it rewrites blocks)."""
        if self._residual is not None:
            self._fp = self._residual.step(k, v, positions, self._rewrite, fixed_shape)

    def _rewrite(self, rows: list[torch.Tensor], positions: torch.Tensor) -> None:
        """Overwrite the K planes (codes, params) of ``positions`` with BNSH ``rows`` (a KIVI block)."""
        raise NotImplementedError

    def _show(self, planes: list[torch.Tensor], positions: torch.Tensor, dtype: torch.dtype) -> None:
        """Make BNSH ``planes`` at ``positions`` what this step attends to, decoded to ``dtype``.

        A KIVI store adds its full-precision slots after the quantized ones, and marks which are which."""
        k, v = self.policy.codec.decode_kv(planes, dtype)
        if self._fp is None:
            self._view = (k, v, positions, None)
            return
        kf, vf, pf = self._fp
        quantized = torch.cat([torch.ones(len(positions), dtype=torch.bool), torch.zeros(len(pf), dtype=torch.bool)])
        self._view = (torch.cat([k, kf], dim=2), torch.cat([v, vf], dim=2), torch.cat([positions, pf]), quantized)

    @staticmethod
    def _bytes(planes: list[torch.Tensor]) -> int:
        return sum(p.numel() * p.element_size() for p in planes)

    @property
    def _residual_bytes(self) -> int:
        return 0 if self._residual is None else self._residual.nbytes

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._view is None else self._view[0]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._view is None else self._view[1]

    @property
    def positions(self) -> torch.Tensor | None:
        return None if self._view is None else self._view[2]

    @property
    def quantized(self) -> torch.Tensor | None:
        """KIVI: which slots of the view hold a position's dequantized copy (``None``: one copy each)."""
        return None if self._view is None else self._view[3]

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
        self._planes: list[torch.Tensor] = []
        self._pos: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        sd, new_positions = self._seq_dim, positions
        planes = [self._store(p) for p in self._encode(k, v)]
        if self._pos is not None:
            planes = [torch.cat([old, new], dim=sd) for old, new in zip(self._planes, planes, strict=True)]
            positions = torch.cat([self._pos, positions])
        self._planes, self._pos = planes, positions
        self._kivi(k, v, new_positions)
        self._show([self._load(p) for p in self._planes], positions, k.dtype)
        keep = self._keep(positions, int(positions.max()))
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            self._planes, self._pos = [p.index_select(sd, idx) for p in self._planes], positions[idx]

    def _rewrite(self, rows: list[torch.Tensor], positions: torch.Tensor) -> None:
        for buffer, r in zip(self._planes[:2], rows, strict=True):  # no window: row index = position
            buffer.index_copy_(self._seq_dim, positions, self._store(r))

    @property
    def nbytes(self) -> int:
        return self._bytes(self._planes) + self._residual_bytes

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
    With ``growth``, the buffer starts at ``growth`` slots and the caller grows it by whole
    blocks (:meth:`reserve`) up to ``capacity``: a cache that grows with the context, as
    ``dynamic`` storage does, whose shape changes once per block instead of once per token.
    """

    def __init__(self, policy: CachePolicy, fixed_shape: bool = False, growth: int | None = None) -> None:
        super().__init__(policy)
        self.capacity = int(policy.capacity)
        self.fixed_shape = fixed_shape
        self.growth = growth
        self._planes: list[torch.Tensor] = []
        self._pos: torch.Tensor | None = None

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Reserve the buffers now (a compiled step must not allocate them inside the graph)."""
        slots = self.capacity if self.growth is None else min(self.growth, self.capacity)
        bnsh = self.policy.layout == "BNSH"
        self._planes = [torch.zeros((batch, heads, slots, width) if bnsh else (batch, slots, heads, width), dtype=dt)
                        for width, dt in self.policy.codec.kv_planes(head_dim, dtype)]  # K's planes, then V's
        self._pos = torch.full((slots,), -1, dtype=torch.long)
        if self._residual is not None:
            self._residual.allocate(batch, heads, head_dim, dtype)

    def reserve(self, tokens: int) -> None:
        """Grow a ``growth`` store by whole blocks (up to ``capacity`` slots) so that ``tokens`` positions fit.

        Slots are a prefix until the ring is full, so the old buffer is the new one's start.
        """
        if self.growth is None or self._pos is None:
            return
        have, slots = len(self._pos), min(self.capacity, -(-tokens // self.growth) * self.growth)
        if slots <= have:
            return
        sd, grown = self._seq_dim, []
        for p in self._planes:
            new = p.new_zeros((*p.shape[:sd], slots, *p.shape[sd + 1:]))
            new.narrow(sd, 0, have).copy_(p)
            grown.append(new)
        pos = torch.full((slots,), -1, dtype=torch.long)
        pos[:have] = self._pos
        self._planes, self._pos = grown, pos

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        window, sinks = self.policy.window, self.policy.sinks
        if window is None:
            return positions.clone()
        return torch.where(positions < sinks, positions, sinks + (positions - sinks) % window)

    def _filled(self) -> int:
        return 0 if self._pos is None else int((self._pos >= 0).sum())

    def _prepare(self, k: torch.Tensor, positions: torch.Tensor) -> None:
        """Allocate on the first append; refuse another batch size, or an unbounded store's overflow."""
        if self._pos is None:
            self.allocate(k.shape[0], k.shape[1], k.shape[-1], k.dtype)
        elif k.shape[0] != self._planes[0].shape[0]:
            raise UnsupportedOpError(
                f"this static KV cache was allocated for batch {self._planes[0].shape[0]}, got batch {k.shape[0]}")
        if self.policy.window is None and not self.fixed_shape and int(positions.max()) >= self.capacity:
            raise KVCacheFullError(
                f"the static KV cache holds max_len={self.capacity} tokens and position {int(positions.max())} "
                "does not fit; raise kv-layout:max_len or use kv-layout:storage=dynamic")

    def _write(self, planes: list[torch.Tensor], positions: torch.Tensor) -> None:
        slots = self._slots(positions)
        if self.policy.window is not None and len(positions) > self.policy.window:
            keep = self._keep(positions, int(positions.max()))
            slots, positions = slots[keep], positions[keep]
            planes = [p[:, :, keep] for p in planes]
        for buffer, p in zip(self._planes, planes, strict=True):
            buffer.index_copy_(self._seq_dim, slots, self._store(p))
        self._pos.index_copy_(0, slots, positions)

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        self._prepare(k, positions)
        new, sd, window = self._encode(k, v), self._seq_dim, self.policy.window
        if window is not None and len(positions) > 1 and int(positions.max()) >= self.policy.sinks + window:
            # A token that lands in the ring evicts a key the chunk's earlier queries may need,
            # so a multi-token chunk that reaches the ring attends to the old slots + the chunk.
            n = self._filled()
            view = [torch.cat([self._load(p.narrow(sd, 0, n)), q], dim=2)
                    for p, q in zip(self._planes, new, strict=True)]
            view_positions = torch.cat([self._pos[:n], positions])
            self._write(new, positions)
            self._show(view, view_positions, k.dtype)
            return
        self._write(new, positions)
        self._kivi(k, v, positions, self.fixed_shape)
        n = len(self._pos) if self.fixed_shape else self._filled()
        self._show([self._load(p.narrow(sd, 0, n)) for p in self._planes], self._pos[:n], k.dtype)

    def _rewrite(self, rows: list[torch.Tensor], positions: torch.Tensor) -> None:
        # no window: slot = position.  The fixed-shape step re-encodes the block of t - R, which may reach
        # past the buffer while incomplete; its rows are never read then, so they are clamped to its last slot
        slots = positions.clamp(max=self._planes[0].shape[self._seq_dim] - 1)
        for buffer, r in zip(self._planes[:2], rows, strict=True):
            buffer.index_copy_(self._seq_dim, slots, self._store(r))

    @property
    def nbytes(self) -> int:
        return self._bytes(self._planes) + self._residual_bytes

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
        self._pages: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (planes, positions)
        self._used = 0  # tokens in the last page

    def _new_page(self, like: list[torch.Tensor]) -> None:
        bs = self.block_size

        def page(p: torch.Tensor) -> torch.Tensor:
            bsz, heads, _, width = p.shape
            return p.new_zeros((bsz, heads, bs, width) if self.policy.layout == "BNSH" else (bsz, bs, heads, width))

        self._pages.append(([page(p) for p in like], torch.full((bs,), -1, dtype=torch.long)))
        self._used = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        new, sd, done = self._encode(k, v), self._seq_dim, 0
        while done < len(positions):
            if not self._pages or self._used == self.block_size:
                self._new_page(new)
            page, pp = self._pages[-1]
            n = min(self.block_size - self._used, len(positions) - done)
            for buffer, p in zip(page, new, strict=True):
                buffer.narrow(sd, self._used, n).copy_(self._store(p[:, :, done:done + n]))
            pp[self._used:self._used + n] = positions[done:done + n]
            self._used += n
            done += n
        self._kivi(k, v, positions)
        self._show(*self._gather(), k.dtype)
        if self.policy.window is not None:
            latest = int(positions.max())
            self._pages = [p for i, p in enumerate(self._pages)
                           if i == len(self._pages) - 1 or bool(self._keep(p[1][p[1] >= 0], latest).any())]

    def _gather(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every page's written slots, concatenated in order: BNSH planes and their positions."""
        last = len(self._pages) - 1
        used = [self._used if i == last else self.block_size for i in range(len(self._pages))]
        planes = [torch.cat([self._load(page[j].narrow(self._seq_dim, 0, n))
                             for (page, _), n in zip(self._pages, used, strict=True)], dim=2)
                  for j in range(len(self._pages[0][0]))]
        return planes, torch.cat([pp[:n] for (_, pp), n in zip(self._pages, used, strict=True)])

    def _rewrite(self, rows: list[torch.Tensor], positions: torch.Tensor) -> None:
        pages, offsets = positions // self.block_size, positions % self.block_size  # no window: no page freed
        for index in pages.unique().tolist():
            sel = (pages == index).nonzero().squeeze(1)
            for buffer, r in zip(self._pages[index][0][:2], rows, strict=True):
                buffer.index_copy_(self._seq_dim, offsets[sel], self._store(r.index_select(2, sel)))

    @property
    def nbytes(self) -> int:
        return sum(self._bytes(page) for page, _ in self._pages) + self._residual_bytes

    @property
    def tokens(self) -> int:
        return sum(int((pp >= 0).sum()) for _, pp in self._pages)


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
