"""The reference executor's KV cache: per-attention-layer K/V in (batch, kv_heads, seq, dim).

Each layer keeps the absolute position of every cached slot, so masks (causal, window,
sinks) are computed from positions, not from slot indices.  That is what lets a bounded
cache (which evicts slots) share the attention kernel with the growing one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCache:
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # (seq,) absolute positions of cached slots

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        if self.k is None:
            self.k, self.v, self.positions = k, v, positions
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
            self.positions = torch.cat([self.positions, positions])


@dataclass
class KVCache:
    """All layers' caches plus the number of tokens seen so far."""

    layers: dict[str, LayerCache] = field(default_factory=dict)
    seen: int = 0

    def layer(self, name: str) -> LayerCache:
        return self.layers.setdefault(name, LayerCache())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.layers.values() for t in (c.k, c.v) if t is not None)
