"""The graph IR: semantic LLM ops on a ``networkx.MultiDiGraph``.

Nodes are op instances (``Linear``, ``Attention``, ``MoE`` …) keyed by a readable,
unique name (``layers.3.attn.q_proj``).  Edges are tensors: each carries the producer's
output slot and the consumer's input slot.  Parameters live in a store beside the graph
and nodes refer to them by name, so tied weights (``lm_head`` = embedding) stay one
tensor.  Graph algorithms (topological order, reachability) come from networkx.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import networkx as nx

from tokopt.optimizer.ir.weights import Weight


class Value(NamedTuple):
    """A tensor in the graph: output ``slot`` of node ``node``."""

    node: str
    slot: int = 0


@dataclass(frozen=True)
class TensorInfo:
    """Static type of an activation.  Shapes omit the leading (batch, sequence) dims."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class Node:
    name: str
    op: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # role -> parameter name
    outputs: list[TensorInfo] = field(default_factory=list)


@dataclass
class ModelMeta:
    """What the model is, independent of its graph: used by reports, backends, tokenizers."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_positions: int
    source: str = ""
    tokenizer_path: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)


class Graph:
    """A model: op graph + parameter store + metadata.

    Inputs are ``Input`` nodes (``input_ids``, ``position_ids``); ``outputs`` maps output
    names (``logits``) to values.  Mutating helpers keep the edge slots consistent;
    ``tokopt.optimizer.ir.verify`` checks the rest.
    """

    def __init__(self, meta: ModelMeta) -> None:
        self.meta = meta
        self.nx = nx.MultiDiGraph()
        self.params: dict[str, Weight] = {}
        self.outputs: dict[str, Value] = {}
        self.history: list[str] = []  # stages applied: frontend name, then each pass
        self._order: tuple[tuple, list[str]] | None = None  # (structure, topological order) last computed

    # -- construction ----------------------------------------------------------------
    def add_node(
        self,
        op: str,
        name: str,
        inputs: list[Value] | tuple[Value, ...] = (),
        attrs: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Value:
        """Add a node, infer its output types, and return its first output."""
        from tokopt.optimizer.ir.ops import get_op

        if name in self.nx:
            raise ValueError(f"duplicate node name {name!r}")
        spec = get_op(op)
        node = Node(name, op, dict(attrs or {}), dict(params or {}))
        for key, default in spec.attrs.items():
            node.attrs.setdefault(key, default)
        self.nx.add_node(name, node=node)
        for slot, value in enumerate(inputs):
            self._connect(value, name, slot)
        node.outputs = spec.infer(node, [self.info(v) for v in inputs], self)
        return Value(name, 0)

    def _connect(self, value: Value, dst: str, dst_slot: int) -> None:
        if value.node not in self.nx:
            raise ValueError(f"input {value.node!r} of {dst!r} does not exist")
        self.nx.add_edge(value.node, dst, src_slot=value.slot, dst_slot=dst_slot)

    def add_param(self, name: str, value: Weight) -> str:
        self.params[name] = value
        return name

    # -- queries ---------------------------------------------------------------------
    def node(self, name: str) -> Node:
        return self.nx.nodes[name]["node"]

    def nodes(self, op: str | None = None) -> list[Node]:
        """Nodes in a deterministic topological order, optionally of one op kind."""
        order = [self.node(n) for n in self.topological_order()]
        return [n for n in order if op is None or n.op == op]

    def topological_order(self) -> list[str]:
        """Nodes in insertion-tie-broken topological order, recomputed only when the structure changed.

        The sort is a Python heap walk (~8 ms on a 30-layer model) and walks, passes and
        checks ask for it hundreds of times per run; comparing the node and edge lists that
        determine it costs a small fraction of that, and catches every way the structure
        can change (``self.nx`` is mutated directly by deserialization, for one).
        """
        structure = (tuple(self.nx.nodes), tuple(self.nx.edges(keys=True)))
        if self._order is None or self._order[0] != structure:
            index = {name: i for i, name in enumerate(structure[0])}
            self._order = (structure, list(nx.lexicographical_topological_sort(self.nx, key=index.__getitem__)))
        return list(self._order[1])

    def inputs_of(self, name: str) -> list[Value]:
        edges = sorted(self.nx.in_edges(name, data=True), key=lambda e: e[2]["dst_slot"])
        return [Value(src, data["src_slot"]) for src, _, data in edges]

    def users_of(self, value: Value) -> list[tuple[str, int]]:
        """(consumer node, input slot) pairs reading ``value``."""
        return [
            (dst, data["dst_slot"])
            for _, dst, data in self.nx.out_edges(value.node, data=True)
            if data["src_slot"] == value.slot
        ]

    def info(self, value: Value) -> TensorInfo:
        return self.node(value.node).outputs[value.slot]

    def producer(self, value: Value) -> Node:
        return self.node(value.node)

    # -- rewriting -------------------------------------------------------------------
    def replace_uses(self, old: Value, new: Value) -> None:
        """Point every consumer of ``old`` (and graph outputs) at ``new``."""
        self._move_uses(old, new, self.users_of(old))

    def insert_after(self, value: Value, op: str, name: str, attrs: dict[str, Any] | None = None,
                     params: dict[str, str] | None = None) -> Value:
        """Add a node reading ``value`` and move every other consumer of ``value`` (and graph outputs) onto it."""
        users = self.users_of(value)  # taken before the new node becomes one of them
        out = self.add_node(op, name, [value], attrs, params)
        self._move_uses(value, out, users)
        return out

    def _move_uses(self, old: Value, new: Value, users: list[tuple[str, int]]) -> None:
        """Point the given (consumer, slot) uses of ``old``, and graph outputs naming it, at ``new``."""
        for dst, slot in users:
            keys = [
                k for k, d in self.nx.get_edge_data(old.node, dst).items()
                if d["src_slot"] == old.slot and d["dst_slot"] == slot
            ]
            for k in keys:
                self.nx.remove_edge(old.node, dst, key=k)
            self._connect(new, dst, slot)
        for key, value in self.outputs.items():
            if value == old:
                self.outputs[key] = new

    def remove_node(self, name: str) -> None:
        self.nx.remove_node(name)

    def eliminate_dead_code(self) -> int:
        """Remove nodes no output depends on, and parameters no node uses.  Returns count."""
        live: set[str] = set()
        for value in self.outputs.values():
            live.add(value.node)
            live |= nx.ancestors(self.nx, value.node)
        dead = [n for n in self.nx.nodes if n not in live and self.node(n).op != "Input"]
        self.nx.remove_nodes_from(dead)
        used = {p for n in self.nodes() for p in n.params.values()}
        for pname in [p for p in self.params if p not in used]:
            del self.params[pname]
        return len(dead)

    def copy(self) -> Graph:
        """Structural copy; parameter tensors are shared (passes replace, never mutate)."""
        g = Graph(copy.deepcopy(self.meta))
        g.nx = nx.MultiDiGraph()
        for name in self.nx.nodes:
            n = self.node(name)
            g.nx.add_node(name, node=Node(n.name, n.op, copy.deepcopy(n.attrs), dict(n.params), list(n.outputs)))
        for src, dst, data in self.nx.edges(data=True):
            g.nx.add_edge(src, dst, **data)
        g.params = dict(self.params)
        g.outputs = dict(self.outputs)
        g.history = list(self.history)
        return g

    def reinfer(self) -> None:
        """Recompute every node's output types (after a pass changed attributes or params)."""
        from tokopt.optimizer.ir.ops import get_op

        for node in self.nodes():
            ins = [self.info(v) for v in self.inputs_of(node.name)]
            node.outputs = get_op(node.op).infer(node, ins, self)

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def __str__(self) -> str:
        from tokopt.optimizer.ir.dump import dump

        return dump(self)
