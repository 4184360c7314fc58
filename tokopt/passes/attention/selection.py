"""Which Attention nodes a pass touches: all of them, or those whose ``layer_index`` is listed."""

from __future__ import annotations

from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer.ir.graph import Graph, Node


def attention_nodes(graph: Graph, layers: list[int] | None, pass_name: str) -> list[Node]:
    """Attention nodes of ``layers`` (``None`` = every layer), in graph order.

    Raises :class:`PreconditionError` for a model without attention and
    :class:`PassOptionError` for a layer index the model does not have.
    """
    nodes = graph.nodes("Attention")
    if not nodes:
        raise PreconditionError(f"{pass_name}: the model has no Attention nodes")
    if layers is None:
        return nodes
    by_index = {n.attrs.get("layer_index", i): n for i, n in enumerate(nodes)}
    missing = sorted(set(layers) - set(by_index))
    if missing:
        raise PassOptionError(
            f"{pass_name}: layers {missing} do not exist; the model has layers 0-{max(by_index)}")
    wanted = set(layers)
    return [n for i, n in by_index.items() if i in wanted]
