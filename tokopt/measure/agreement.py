"""Measured against analytic: where the artifact disagrees with what the IR says it should be.

The analytic figures (weight bytes, KV bytes at a context) come from the graph; the measured
ones from the artifact that ships (its files on disk, its session's allocated cache).  A stage
whose two differ by more than :data:`TOLERANCE` is flagged in every output, and ``--strict``
fails the run on it: a report must describe the artifact, not the IR it came from.
"""

from __future__ import annotations

from typing import Any

TOLERANCE = 0.10


def _flag(metric: str, measured: float, analytic: float, context: str | None = None) -> dict[str, Any] | None:
    if not analytic or abs(measured / analytic - 1) <= TOLERANCE:
        return None
    where = f" at {context} tokens" if context else ""
    return {"metric": metric, "context": int(context) if context else None, "measured": measured,
            "analytic": analytic, "ratio": measured / analytic,
            "message": f"{metric}{where}: measured {measured:,.0f} B, the IR says {analytic:,.0f} B "
                       f"({measured / analytic:.2f}x)"}


def disagreements(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Each measured figure of a stage's ``metrics`` more than 10 % away from its analytic counterpart."""
    found = []
    if metrics.get("artifact_bytes") is not None:
        found.append(_flag("artifact_bytes", metrics["artifact_bytes"], metrics["weight_bytes"]))
    analytic = metrics.get("kv_bytes_at") or {}
    for context, measured in sorted((metrics.get("kv_bytes_measured") or {}).items(), key=lambda kv: int(kv[0])):
        if context in analytic:
            found.append(_flag("kv_bytes", measured, analytic[context], context))
    return [f for f in found if f is not None]


__all__ = ["TOLERANCE", "disagreements"]
