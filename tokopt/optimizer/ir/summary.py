"""A model's vital statistics as one flat dictionary (``tokopt inspect``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.ir.graph import Graph


def _uniform(values: list[Any]) -> Any:
    """The common value, or the per-layer list when layers differ."""
    return values[0] if values and all(v == values[0] for v in values) else values


def describe(graph: Graph) -> dict[str, Any]:
    attn = graph.nodes("Attention")
    moe = graph.nodes("MoE")
    metrics = static_metrics(graph)
    info: dict[str, Any] = {
        "source": graph.meta.source,
        "architecture": graph.meta.architecture,
        "model_type": graph.meta.model_type,
        "layers": graph.meta.num_layers,
        "hidden_size": graph.meta.hidden_size,
        "vocab_size": graph.meta.vocab_size,
        "num_heads": _uniform([n.attrs["num_heads"] for n in attn]),
        "num_kv_heads": _uniform([n.attrs["num_kv_heads"] for n in attn]),
        "head_dim": _uniform([n.attrs["head_dim"] for n in attn]),
        "window": _uniform([n.attrs.get("window") for n in attn]),
        "sinks": _uniform([n.attrs.get("sinks", 0) for n in attn]),
        "kv_cache_dtype": _uniform([n.attrs["kv_cache"]["dtype"] for n in attn]),
        "rope_theta": _uniform([(n.attrs.get("rope") or {}).get("theta") for n in attn]),
        "weight_dtypes": dict(Counter(_dtype_label(graph, p) for p in graph.params)),
        "nodes": len(graph),
        "op_counts": dict(Counter(n.op for n in graph.nodes())),
        "history": list(graph.history),
        **metrics.as_dict(),
    }
    if moe:
        info["num_experts"] = _uniform([n.attrs["num_experts"] for n in moe])
        info["experts_per_token"] = _uniform([n.attrs["top_k"] for n in moe])
    return info


def _dtype_label(graph: Graph, name: str) -> str:
    from tokopt.optimizer.ir.weights import weight_dtype

    return weight_dtype(graph.params[name])
