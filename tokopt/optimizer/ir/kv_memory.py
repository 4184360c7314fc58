"""How many KV-cache bytes a configuration reserves: the memory model behind ``kv-layout``.

The reference executor's stores (:mod:`tokopt.optimizer.interpret.kv_cache`) reserve memory
differently for the same tokens:

- ``dynamic``: a batch is one padded tensor growing to its longest sequence;
- ``static``: every sequence owns ``max_len`` slots (``sinks + window`` when windowed) from
  the start — no allocation while decoding, the most memory;
- ``paged``: each sequence owns whole pages of ``block_size`` tokens, allocated on demand
  and (with a window) freed once every token in them has been evicted.

:func:`reserved_kv_bytes` computes the bytes for a batch of mixed lengths from the graph
alone; the tests check it against the real cache's ``nbytes``.

A KIVI cache (``kv_cache.quant.key_axis == "channel"``) also keeps, whatever its storage, a ring
of ``residual + token_group`` full-precision K/V slots per sequence (float32, the IR's compute
type; a session computing in another dtype keeps them in that one), allocated with its first
token: a constant :func:`residual_kv_bytes` on top of the per-token figure, which
``kv_bytes_per_token`` (the amortised cost of one more token) leaves out.
"""

from __future__ import annotations

import math

from tokopt.optimizer.ir.attrs import kv_residual_slots
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.ops import kv_bytes_per_token


def layer_slots(attrs: dict, lengths: list[int], max_positions: int = 0) -> int:
    """KV slots (tokens) one attention layer reserves for sequences of ``lengths``."""
    kv = attrs.get("kv_cache") or {}
    storage = kv.get("storage") or "dynamic"
    window = attrs.get("window") or None
    sinks = int(attrs.get("sinks") or 0) if window else 0
    cap = sinks + window if window else None
    if storage == "static":
        return len(lengths) * int(cap or kv.get("max_len") or max_positions)
    if storage == "paged":
        return sum(_paged_slots(n, int(kv.get("block_size") or 16), window, sinks) for n in lengths)
    longest = max(lengths, default=0)
    return len(lengths) * (min(longest, cap) if cap else longest)


def _paged_slots(length: int, block: int, window: int | None, sinks: int) -> int:
    pages = math.ceil(length / block)
    if window is None or pages == 0:
        return pages * block
    oldest = length - window  # positions > oldest are in the window of the next query
    kept = sum(1 for j in range(pages)
               if j == pages - 1 or (j + 1) * block - 1 > oldest or j * block < sinks)
    return kept * block


def residual_kv_bytes(attrs: dict, lengths: list[int]) -> int:
    """Bytes of a KIVI layer's full-precision ring for a batch of ``lengths`` (0 for other caches, or no tokens)."""
    slots = kv_residual_slots(attrs.get("kv_cache"))
    if not slots or not any(lengths):
        return 0
    return len(lengths) * slots * 2 * attrs["num_kv_heads"] * attrs["head_dim"] * 4


def reserved_kv_bytes(graph: Graph, lengths: list[int]) -> int:
    """Bytes the KV cache reserves for a batch of sequences of ``lengths`` tokens (all layers)."""
    max_pos = graph.meta.max_positions
    return int(sum(kv_bytes_per_token(n.attrs) * layer_slots(n.attrs, lengths, max_pos)
                   + residual_kv_bytes(n.attrs, lengths) for n in graph.nodes("Attention")))
