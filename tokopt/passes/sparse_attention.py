"""sparse-attention: a sliding attention window with sink tokens (StreamingLLM).

Each selected layer attends only to the last ``window`` positions plus the first
``sinks`` positions of the sequence.  The sink tokens soak up the attention mass a
softmax must put somewhere; without them, quality collapses once the context outgrows
the window.  The KV cache becomes bounded (``sinks`` sink slots + a ring of ``window``
slots), so KV memory per sequence stops growing with context.

Positions: cached keys keep their original absolute RoPE positions (queries too), not
positions within the cache as in the StreamingLLM paper.  A windowed prefill then equals
windowed decoding exactly, keys never need re-rotation, and it is what transformers'
sliding-window models do.  The price: past the model's ``max_position_embeddings`` the
query-to-sink distance leaves the trained range — the pass warns when that is reachable.
"""

from __future__ import annotations

from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.pass_api import Option, Pass, PassContext, PassResult, at_least
from tokopt.passes.attention.selection import attention_nodes


class SparseAttention(Pass):
    """Sliding-window attention with attention sinks on the selected layers.

    Guarantees: every selected Attention node gets ``window``/``sinks``; nothing else in
    the graph changes; KV bytes at a context ``c`` become ``min(c, window + sinks)`` tokens'
    worth for those layers.
    """

    name = "sparse-attention"
    summary = "Sliding window + attention sinks (StreamingLLM): bounded KV cache, attention span capped."
    options = (
        Option("window", "int", 256, "Recent tokens each query attends to (itself included).", check=at_least(1)),
        Option("sinks", "int", 4, "Initial tokens always attended to (attention sinks); 0 disables.",
               check=at_least(0)),
        Option("layers", "int_list", None, "Layer indices to change, e.g. 0;2;4-7 (default: all layers)."),
    )
    requires = frozenset({"attention"})
    ensures = frozenset({"window"})
    moves = ("kv_bytes_at", "flops_per_token", "long_ppl", "ppl")
    changes_numerics = True

    def check(self, graph: Graph, ctx: PassContext) -> None:
        attention_nodes(graph, self.opts["layers"], self.name)

    def preview(self, graph: Graph, ctx: PassContext) -> Graph:
        return self.run(graph, ctx).graph  # attributes only: running it is the cheapest exact preview

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        window, sinks = self.opts["window"], self.opts["sinks"]
        out = graph.copy()
        changed, notes, kept = [], [], []
        for node in attention_nodes(out, self.opts["layers"], self.name):
            old = (node.attrs.get("window"), int(node.attrs.get("sinks") or 0))
            if old == (window, sinks):
                continue
            if old[0] is not None and old[0] <= window:  # a trained local layer (Gemma, Mistral, gpt-oss)
                kept.append(node.attrs.get("layer_index"))
                continue
            if old[0] is not None:
                notes.append(f"{node.name}: narrowed its trained window {old[0]} to {window}")
            node.attrs["window"], node.attrs["sinks"] = window, sinks
            changed.append(node.attrs.get("layer_index"))
        if kept:
            notes.append(f"layer(s) {_ranges(kept)} keep their trained window (at most {window}): widening it, or "
                         "adding sinks, would show a local layer context it was never trained on")
        if not changed:
            return PassResult(graph, False, [f"every selected layer already has window={window}, sinks={sinks} "
                                             "or a narrower trained window", *notes])
        max_pos = graph.meta.max_positions
        if sinks and max_pos:
            notes.append(f"keys keep original RoPE positions: sink distances stay in the trained range up to "
                         f"{max_pos} tokens of context")
        notes.insert(0, f"window={window}, sinks={sinks} on {len(changed)} layer(s): {_ranges(changed)}; "
                        f"KV cache bounded at {window + sinks} tokens per layer")
        return PassResult(out, True, notes)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2;5' (the option syntax)."""
    parts, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ";".join(parts)
