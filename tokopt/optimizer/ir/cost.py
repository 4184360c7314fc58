"""Analytic metrics computed from the graph alone (no execution).

These are exact consequences of the IR: parameter count, bytes as stored, KV-cache bytes
per token (window-aware), FLOPs per decoded token, and the decode speed-of-light — the
machine's memory bandwidth divided by the bytes one decoded token must read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.kv_memory import reserved_kv_bytes
from tokopt.optimizer.ir.ops import get_op, kv_bytes_per_token, param_bytes
from tokopt.optimizer.ir.weights import weight_nbytes, weight_numel

DEFAULT_CONTEXTS = (512, 2048, 8192, 32768)


@dataclass
class StaticMetrics:
    params: int
    weight_bytes: int
    bits_per_param: float
    kv_bytes_per_token: float
    kv_bytes_at: dict[str, float]
    flops_per_token: int
    bytes_per_token: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_params(graph: Graph) -> int:
    return sum(weight_numel(w) for w in graph.params.values())


def weight_bytes(graph: Graph) -> int:
    return sum(weight_nbytes(w) for w in graph.params.values())


def kv_bytes_for_context(graph: Graph, context: int) -> float:
    """KV-cache bytes one sequence of ``context`` tokens holds: windows cap it, static storage reserves its
    slots up front, pages round it up (:mod:`tokopt.optimizer.ir.kv_memory`) — what a session should measure."""
    return float(reserved_kv_bytes(graph, [context]))


def flops_per_token(graph: Graph, context: int = 1) -> int:
    return sum(get_op(n.op).flops(n, graph, context) for n in graph.nodes())


def bytes_read_per_token(graph: Graph) -> int:
    """Parameter bytes a decode step reads (embedding: one row; MoE: routed experts only)."""
    total = 0
    seen: set[str] = set()
    for node in graph.nodes():
        spec = get_op(node.op)
        if spec.bytes_read is not None:
            total += spec.bytes_read(node, graph, 0)
            continue
        fresh = [p for p in node.params.values() if p not in seen]
        seen.update(fresh)
        total += sum(weight_nbytes(graph.params[p]) for p in fresh)
    return total


def static_metrics(graph: Graph, contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
                   flops_context: int = 512) -> StaticMetrics:
    n = count_params(graph)
    wb = weight_bytes(graph)
    return StaticMetrics(
        params=n,
        weight_bytes=wb,
        bits_per_param=8 * wb / n if n else 0.0,
        kv_bytes_per_token=sum(kv_bytes_per_token(n.attrs) for n in graph.nodes("Attention")),
        kv_bytes_at={str(c): kv_bytes_for_context(graph, c) for c in contexts},
        flops_per_token=flops_per_token(graph, flops_context),
        bytes_per_token=bytes_read_per_token(graph),
    )


__all__ = [
    "StaticMetrics", "count_params", "weight_bytes", "kv_bytes_for_context", "flops_per_token",
    "bytes_read_per_token", "static_metrics", "param_bytes",
]
