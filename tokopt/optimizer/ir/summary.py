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
    info["features"] = features(graph)
    return info


def features(graph: Graph) -> dict[str, Any]:
    """What sets this model's graph apart, read from the IR itself (not from its model_type).

    Per-layer values collapse to one when every layer agrees (:func:`_uniform`); a layer
    without RoPE (NoPE) shows ``None`` in ``rope``."""
    attn, moe = graph.nodes("Attention"), graph.nodes("MoE")
    norms = [n for n in graph.nodes("RMSNorm") if n.name.startswith("layers.")]
    per_layer = Counter(n.name.split(".")[1] for n in norms + graph.nodes("LayerNorm") if n.name.startswith("layers."))
    out: dict[str, Any] = {
        "rope": _uniform([_rope_label(n.attrs.get("rope")) for n in attn]),
        "attention_scale": _uniform([n.attrs["scale"] for n in attn]),
        "attention_softcap": _uniform([n.attrs.get("softcap") for n in attn]),
        "qk_norm": _uniform([_qk_norm_label(graph, n) for n in attn]),
        "learned_sink_logits": _uniform(["sink_logits" in n.params for n in attn]),
        "norms_per_layer": _uniform(list(per_layer.values())),
        "scales": {n.name: n.attrs["factor"] for n in graph.nodes("Scale")},
        "final_softcap": _uniform([n.attrs["cap"] for n in graph.nodes("Softcap")]) or None,
    }
    if moe:
        out["moe"] = _uniform([{"routing": n.attrs.get("routing", "softmax_topk"),
                                "norm_topk_prob": n.attrs["norm_topk_prob"],
                                "glu": n.attrs.get("glu") or n.attrs["activation"],
                                "shared_expert": "shared.gate" in n.params,
                                "biases": sorted(r for r in n.params if r.endswith("_bias"))} for n in moe])
    return out


def _rope_label(rope: dict[str, Any] | None) -> dict[str, Any] | None:
    if rope is None:
        return None
    label = {"type": rope.get("type"), "theta": rope.get("theta"), "rotary_dim": rope["rotary_dim"]}
    if rope.get("long_inv_freq"):
        label["long_from"] = rope["original_max_positions"]
    return label


def _qk_norm_label(graph: Graph, node: Any) -> str | None:
    """``per-head`` (the Attention's own q/k norms), ``projection`` (RMSNorm nodes on the q/k Linears), or None."""
    if node.attrs.get("qk_norm"):
        return "per-head"
    q, k = (graph.producer(v) for v in graph.inputs_of(node.name)[:2])
    return "projection" if q.op == "RMSNorm" and k.op == "RMSNorm" else None


def _dtype_label(graph: Graph, name: str) -> str:
    from tokopt.optimizer.ir.weights import weight_dtype

    return weight_dtype(graph.params[name])
