"""The IR, described inside the ONNX file so tokopt can read its own output back exactly.

``tokopt.graph`` (model metadata) holds the nodes with their attributes and edges, the
model metadata, the history, and for every parameter the initializer(s) it was stored in
and how (transposed, stacked, MatMulNBits-packed).  The ONNX frontend inverts that map,
so a round trip yields the same graph with the same (bit-identical) weights.
"""

from __future__ import annotations

import dataclasses
import json

from tokopt.backends.onnxruntime.lower import LowerContext

FORMAT = 1


def describe_graph(ctx: LowerContext) -> dict:
    graph = ctx.graph
    nodes = []
    for node in graph.nodes():
        nodes.append({"name": node.name, "op": node.op, "attrs": node.attrs, "params": node.params,
                      "inputs": [[v.node, v.slot] for v in graph.inputs_of(node.name)]})
    params = {}
    for name, w in graph.params.items():
        stored = ctx.params.get(name)
        if stored is None:
            continue
        params[name] = {**stored, "param_shape": list(w.shape)}
    return {"format": FORMAT, "meta": dataclasses.asdict(graph.meta), "history": graph.history, "nodes": nodes,
            "outputs": {k: [v.node, v.slot] for k, v in graph.outputs.items()}, "params": params}


def embed_graph_description(ctx: LowerContext) -> None:
    ctx.b.metadata["tokopt.graph"] = json.dumps(describe_graph(ctx), default=float)
