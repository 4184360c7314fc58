"""IR invariants, checked after the frontend and after every pass.

A pass that breaks the graph is caught here, before a backend or a report sees it,
and the error names the stage that produced it.
"""

from __future__ import annotations

import math

import networkx as nx

from tokopt.errors import UnsupportedOpError, VerificationError
from tokopt.optimizer.ir.attrs import (
    check_act_dtype,
    check_act_quant,
    check_kv_cache,
    check_moe,
    check_rope,
    check_span,
)
from tokopt.optimizer.ir.graph import Graph, Node
from tokopt.optimizer.ir.ops import get_op
from tokopt.optimizer.ir.weights import weight_shape


def verify(graph: Graph, stage: str = "graph") -> None:
    """Raise :class:`VerificationError` listing every broken invariant."""
    problems: list[str] = []
    if not nx.is_directed_acyclic_graph(graph.nx):
        problems.append("graph has a cycle")
        raise VerificationError(problems, stage)
    if "logits" not in graph.outputs:
        problems.append("graph has no 'logits' output")
    for name, value in graph.outputs.items():
        if value.node not in graph.nx:
            problems.append(f"output {name!r} refers to missing node {value.node!r}")
    for node in graph.nodes():
        problems.extend(_check_node(graph, node))
    if problems:
        raise VerificationError(problems, stage)


def _check_node(graph: Graph, node: Node) -> list[str]:
    problems: list[str] = []
    try:
        spec = get_op(node.op)
    except UnsupportedOpError as exc:
        return [f"{node.name}: {exc}"]
    ins = graph.inputs_of(node.name)
    slots = [d["dst_slot"] for _, _, d in graph.nx.in_edges(node.name, data=True)]
    if len(set(slots)) != len(slots):
        problems.append(f"{node.name}: an input slot is connected twice")
    if not spec.variadic and len(ins) != len(spec.inputs):
        problems.append(f"{node.name} ({node.op}): {len(ins)} inputs connected, expected {len(spec.inputs)}")
    for value in ins:
        producer = graph.node(value.node)
        if value.slot >= len(producer.outputs):
            problems.append(f"{node.name}: reads output {value.slot} of {value.node}, "
                            f"which has {len(producer.outputs)}")
    for role in spec.params:
        if role not in node.params:
            problems.append(f"{node.name} ({node.op}): missing parameter {role!r}")
    for role, pname in node.params.items():
        if role not in spec.params and role not in spec.optional_params:
            problems.append(f"{node.name}: unexpected parameter role {role!r}")
        if pname not in graph.params:
            problems.append(f"{node.name}: parameter {pname!r} is not in the store")
    if problems:
        return problems
    try:
        expected = spec.infer(node, [graph.info(v) for v in ins], graph)
    except Exception as exc:  # noqa: BLE001 - an inference failure is a verification finding
        return [f"{node.name}: shape inference failed: {exc}"]
    if expected != node.outputs:
        problems.append(f"{node.name}: recorded outputs {node.outputs} disagree with inferred {expected}")
    problems.extend(_check_shapes(graph, node, [graph.info(v) for v in ins]))
    return problems


def _check_shapes(graph: Graph, node: Node, ins: list) -> list[str]:
    p = graph.params
    if node.op == "Linear":
        w = weight_shape(p[node.params["weight"]])
        if len(w) != 2 or ins[0].shape[-1:] != (w[1],):
            return [f"{node.name}: input width {ins[0].shape} does not match weight {w}"]
        if "bias" in node.params and weight_shape(p[node.params["bias"]]) != (w[0],):
            return [f"{node.name}: bias shape does not match out_features {w[0]}"]
        if (why := check_act_quant(node.attrs.get("act_quant"), w[1])) is not None:
            return [f"{node.name}: {why}"]
        if (why := check_act_dtype(node.attrs.get("act_dtype"), node.attrs.get("act_quant"))) is not None:
            return [f"{node.name}: {why}"]
    elif node.op in ("RMSNorm", "LayerNorm"):
        if weight_shape(p[node.params["weight"]]) != ins[0].shape[-1:]:
            return [f"{node.name}: norm weight does not match width {ins[0].shape}"]
    elif node.op in ("Add", "Mul"):
        if ins[0].shape != ins[1].shape:
            return [f"{node.name}: operand shapes differ {ins[0].shape} vs {ins[1].shape}"]
    elif node.op == "Attention":
        return _check_attention(graph, node, ins)
    elif node.op == "MoE":
        return _check_moe(graph, node)
    elif node.op == "Scale" and not (isinstance(node.attrs["factor"], float) and math.isfinite(node.attrs["factor"])):
        return [f"{node.name}: Scale factor {node.attrs['factor']!r} must be a finite float"]
    elif node.op == "Softcap" and not (isinstance(node.attrs["cap"], float) and node.attrs["cap"] > 0):
        return [f"{node.name}: Softcap cap {node.attrs['cap']!r} must be a float > 0"]
    return []


def _check_moe(graph: Graph, node: Node) -> list[str]:
    a, p = node.attrs, graph.params
    e, i, h = weight_shape(p[node.params["experts.gate"]])
    if (e, i, h) != (a["num_experts"], a["intermediate_size"], a["hidden_size"]):
        return [f"{node.name}: expert weights {(e, i, h)} disagree with attributes"]
    if not 0 < a["top_k"] <= e:
        return [f"{node.name}: top_k={a['top_k']} outside 1..{e}"]
    problems = [f"{node.name}: {why}" for why in check_moe(a)]
    for role, shape in (("router_bias", (e,)), ("experts.gate_bias", (e, i)), ("experts.up_bias", (e, i)),
                        ("experts.down_bias", (e, h))):
        if role in node.params and weight_shape(p[node.params[role]]) != shape:
            problems.append(f"{node.name}: {role} must have shape {shape}")
    return problems


def _check_attention(graph: Graph, node: Node, ins: list) -> list[str]:
    a = node.attrs
    h, kvh, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    problems = []
    if not (h and kvh and d):
        return [f"{node.name}: num_heads, num_kv_heads and head_dim must be set"]
    if h % kvh:
        problems.append(f"{node.name}: num_heads={h} is not a multiple of num_kv_heads={kvh}")
    if ins[0].shape != (h * d,):
        problems.append(f"{node.name}: q width {ins[0].shape} != num_heads*head_dim = {h * d}")
    for label, info in (("k", ins[1]), ("v", ins[2])):
        if info.shape != (kvh * d,):
            problems.append(f"{node.name}: {label} width {info.shape} != num_kv_heads*head_dim = {kvh * d}")
    problems.extend(f"{node.name}: {why}" for why in
                    (*check_span(a), *check_kv_cache(a), *check_rope(a.get("rope"), d)))
    for role, shape in (("q_norm", (d,)), ("k_norm", (d,)), ("sink_logits", (h,))):
        if role in node.params and weight_shape(graph.params[node.params[role]]) != shape:
            problems.append(f"{node.name}: {role} weight must have shape {shape}")
    return problems
