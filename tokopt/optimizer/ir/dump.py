"""A readable text form of a graph, one node per line (``tokopt inspect --graph``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokopt.optimizer.ir.weights import weight_dtype, weight_shape

if TYPE_CHECKING:
    from tokopt.optimizer.ir.graph import Graph

_SKIP_ATTRS = {"inv_freq"}


def _fmt_attr(value: object) -> str:
    if isinstance(value, dict):
        inner = ", ".join(f"{k}={_fmt_attr(v)}" for k, v in value.items() if k not in _SKIP_ATTRS and v is not None)
        return "{" + inner + "}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def dump(graph: Graph) -> str:
    lines = [f"graph {graph.meta.architecture} ({graph.meta.model_type}) from {graph.meta.source or '?'}"]
    for node in graph.nodes():
        ins = ", ".join(f"%{v.node}" + (f":{v.slot}" if v.slot else "") for v in graph.inputs_of(node.name))
        attrs = ", ".join(f"{k}={_fmt_attr(v)}" for k, v in node.attrs.items() if v is not None)
        params = ", ".join(
            f"{role}={name}<{weight_dtype(graph.params[name])}{list(weight_shape(graph.params[name]))}>"
            for role, name in node.params.items()
        )
        out = ", ".join(f"{o.dtype}{list(o.shape)}" for o in node.outputs)
        line = f"  %{node.name} = {node.op}({ins}) -> {out}"
        if attrs:
            line += f"  {{{attrs}}}"
        if params:
            line += f"  [{params}]"
        lines.append(line)
    lines.append("  return " + ", ".join(f"{k}=%{v.node}" for k, v in graph.outputs.items()))
    return "\n".join(lines)
