"""KV-cache quantization for the ``quantize`` pass: an integer ``kv_cache.dtype`` on every Attention.

The cache stores per-token (per-head, optionally per-group) scales; the reference attention honours
the format in prefill and decode (:mod:`tokopt.optimizer.interpret.kv_quant`), the schema lives in
:mod:`tokopt.optimizer.ir.attrs`.
"""

from __future__ import annotations

from tokopt.optimizer.ir.attrs import kv_cache_quant_attrs
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.ops import kv_bytes_per_token


def quantize_kv_cache(g: Graph, bits: int, symmetric: bool | None, group_size: int | None) -> str:
    """Set an int``bits`` cache on every Attention of ``g``; returns the note for the report."""
    sym = symmetric if symmetric is not None else bits == 8
    before = after = 0.0
    for node in g.nodes("Attention"):
        a = node.attrs
        before += kv_bytes_per_token(a)
        a["kv_cache"] = {**a["kv_cache"], **kv_cache_quant_attrs(
            bits, a["num_kv_heads"], a["head_dim"], group_size, sym, "float16")}
        after += kv_bytes_per_token(a)
    spec = g.nodes("Attention")[0].attrs["kv_cache"]["quant"]
    return (f"KV cache: int{bits} {'sym' if sym else 'asym'}, {spec['granularity']} float16 scales, "
            f"{before:,.0f} → {after:,.0f} bytes/token ({after / before:.3f}×)")
