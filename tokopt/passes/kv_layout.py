"""kv-layout: how the KV cache is laid out and allocated (BNSH/BSNH; dynamic, static, paged).

The pass changes no numbers: it records the cache's layout and storage on each
Attention node's ``kv_cache`` attribute, where every backend reads it and honours it or
refuses with a clear error.  What it buys is memory and allocation behaviour: ``static``
pre-allocates ``max_len`` slots per sequence (no allocation while decoding, as CUDA-graph
and TensorRT engines want), ``paged`` reserves whole pages on demand so a batch of mixed
lengths wastes at most one page per sequence.  The notes report the reserved KV bytes for
a batch of mixed lengths before and after (:func:`~tokopt.optimizer.ir.kv_memory.reserved_kv_bytes`).
"""

from __future__ import annotations

from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.kv_memory import reserved_kv_bytes
from tokopt.optimizer.pass_api import Option, Pass, PassContext, PassResult, at_least
from tokopt.passes.attention.selection import attention_nodes

# A batch of mixed lengths the notes quote reserved bytes for (chat-like: short and long).
SAMPLE_LENGTHS = (37, 180, 512, 900, 2048, 64, 333, 1200)
DEFAULT_BLOCK_SIZE = 16


class KVLayout(Pass):
    """Set the KV cache's layout and storage on the selected attention layers.

    Guarantees: only ``kv_cache`` attributes change (``layout``, ``storage``, ``block_size``,
    ``max_len``); outputs are bit-identical on the reference executor as long as a static
    cache's ``max_len`` is not exceeded (then it raises KVCacheFullError).
    """

    name = "kv-layout"
    summary = "KV cache layout (BNSH/BSNH) and storage (dynamic, static pre-allocated, paged with a block size)."
    options = (
        Option("layout", "str", None, "Cache tensor order: BNSH (batch, heads, seq, dim) or BSNH.",
               choices=("BNSH", "BSNH")),
        Option("storage", "str", None, "dynamic (grows), static (pre-allocated max_len), paged (block_size pages).",
               choices=("dynamic", "static", "paged")),
        Option("block_size", "int", None, f"Tokens per page when paged (default {DEFAULT_BLOCK_SIZE}).",
               check=at_least(1)),
        Option("max_len", "int", None, "Slots a static cache pre-allocates per sequence (default: the model's "
               "max positions, or sinks + window on windowed layers).", check=at_least(1)),
        Option("layers", "int_list", None, "Layer indices to change (default: all layers)."),
    )
    requires = frozenset({"attention"})
    moves = ("peak_rss_bytes", "decode_tok_s")
    changes_numerics = False

    def validate(self) -> None:
        o = self.opts
        if o["layout"] is None and o["storage"] is None:
            raise PassOptionError(f"{self.name}: give layout=BNSH|BSNH and/or storage=dynamic|static|paged")
        if o["block_size"] is not None and o["storage"] != "paged":
            raise PassOptionError(f"{self.name}: block_size only applies to storage=paged")
        if o["max_len"] is not None and o["storage"] != "static":
            raise PassOptionError(f"{self.name}: max_len only applies to storage=static")

    def check(self, graph: Graph, ctx: PassContext) -> None:
        max_len = self.opts["max_len"]
        for node in attention_nodes(graph, self.opts["layers"], self.name):
            window, sinks = node.attrs.get("window"), int(node.attrs.get("sinks") or 0)
            if max_len and window and max_len < window + sinks:
                raise PreconditionError(
                    f"{self.name}: max_len={max_len} cannot hold {node.name}'s {sinks} sinks + {window}-token window; "
                    f"use max_len >= {window + sinks} or leave it unset (windowed layers need sinks + window slots)")

    def preview(self, graph: Graph, ctx: PassContext) -> Graph:
        return self.run(graph, ctx).graph  # attributes only: running it is the cheapest exact preview

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.check(graph, ctx)
        o = self.opts
        out = graph.copy()
        changed = 0
        for node in attention_nodes(out, o["layers"], self.name):
            old = dict(node.attrs["kv_cache"])
            new = dict(old)
            if o["layout"]:
                new["layout"] = o["layout"]
            if o["storage"]:
                new["storage"] = o["storage"]
                new["block_size"] = (o["block_size"] or DEFAULT_BLOCK_SIZE) if o["storage"] == "paged" else None
                if o["storage"] == "static":
                    new["max_len"] = o["max_len"] or (None if node.attrs.get("window") else graph.meta.max_positions)
                else:
                    new.pop("max_len", None)
            if new != old:
                node.attrs["kv_cache"] = new
                changed += 1
        if not changed:
            return PassResult(graph, False, ["the KV cache already has this layout and storage"])
        lengths = list(SAMPLE_LENGTHS)
        before, after = reserved_kv_bytes(graph, lengths), reserved_kv_bytes(out, lengths)
        first = out.nodes("Attention")[0].attrs["kv_cache"]
        desc = ", ".join(f"{k}={first.get(k)}" for k in ("layout", "storage", "block_size", "max_len")
                         if first.get(k) is not None)
        return PassResult(out, True, [
            f"{changed} layer(s): {desc}",
            f"reserved KV bytes for a batch of lengths {lengths}: {before / 2**20:,.1f} MiB → "
            f"{after / 2**20:,.1f} MiB ({after / before:.2f}×)" if before else "no KV memory before",
        ])
