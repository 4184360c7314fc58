"""Orthogonal rotations folded into the weights before GPTQ (QuaRot's residual and value rotations).

Why: GPTQ fits one scale per group of 32 input columns, and a language model's weights and inputs
carry their information in a few large coordinates.  Rotating the residual stream by an orthogonal
``Q`` (``x' = x Q``) spreads those over every column.  RMSNorm commutes with ``Q`` once its gain is
folded into the Linears that read it, so the rotation lives entirely in the stored weights: the
embedding becomes ``E Q``, each reader ``W diag(g) Q``, each writer ``Q^T W``.  Per head, the values
and ``o_proj``'s columns take a Hadamard ``H`` the same way (attention is linear in the values).  In
exact arithmetic the model's function is unchanged; nothing is added at run time, except for a model
whose lm_head is tied to the embedding: the table can hold ``E Q`` for both uses only if the final
norm's gain moves into a small ``hidden x hidden`` Linear after it (``Q^T diag(g) Q``, kept in float).

Measured on SmolLM2 (GPTQ int4 g32, three calibration windows; figures in the CHANGELOG): prose loses
~3.4 points less, docstrings ~0.75 more.  Round-to-nearest gets worse (the folded gains expose the
massive-activation channels they suppress, and RTN has no Hessian to protect them), so the pass
rotates only for GPTQ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch

from tokopt.optimizer.ir.graph import Graph, Node, Value
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize

log = logging.getLogger(__name__)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``m`` by Paley's constructions over a prime field (I: m = q + 1 with
    q = 3 mod 4; II: m = 2 (q + 1) with q = 1 mod 4), or None."""
    def jacobsthal(q: int) -> torch.Tensor:
        squares = {i * i % q for i in range(1, q)}
        chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
        return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)

    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        c = torch.zeros(m, m, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, -1, jacobsthal(q)
        return c + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
        on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        on_one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, on_one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), on_zero)
    return None


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order ``n`` in float64: Sylvester's for a power of two, else
    Paley's of order ``m`` times Sylvester's of ``n / m`` (576 = 36 x 16 for SmolLM2, 960 = 60 x 16, 896 = 28 x 32).

    Raises ValueError when no such ``m`` exists (the rotation is then not applied, and the pass says so).
    """
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    m = n // power
    while True:
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            return torch.kron(base, _sylvester(n // m)) / n ** 0.5
        if m == n:
            break
        m *= 2
    raise ValueError(f"no Hadamard construction of order {n} (a power of two times a Paley order)")


def rotatable_heads(graph: Graph) -> list[tuple[Node, Node, Node]]:
    """(attention, v_proj, o_proj) triples whose value/output rotation folds exactly into float weights.

    A triple qualifies when the values come straight from a Linear read by nothing else, the attention
    output goes straight into one Linear, both weights are float and used by no other node, and the head
    size is a power of two.
    """
    uses = _param_users(graph)
    triples = []
    for att in graph.nodes("Attention"):
        hd = att.attrs["head_dim"]
        v_value = graph.inputs_of(att.name)[2]
        v_proj = graph.node(v_value.node)
        readers = graph.users_of(Value(att.name, 0))
        if v_proj.op != "Linear" or len(graph.users_of(v_value)) != 1 or len(readers) != 1 or hd & (hd - 1):
            continue
        o_proj = graph.node(readers[0][0])
        if o_proj.op != "Linear" or att.name in graph.outputs.values():
            continue
        weights = [v_proj.params["weight"], o_proj.params["weight"]]
        if any(len(uses[p]) != 1 or isinstance(graph.params[p], QuantizedWeight) for p in weights):
            continue
        triples.append((att, v_proj, o_proj))
    return triples


def _head_rows(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``H^T`` applied to each head's block of rows (a v_proj weight or bias)."""
    return torch.einsum("ji,kj...->ki...", h, w.reshape(-1, h.shape[0], *w.shape[1:])).reshape(w.shape)


def _head_columns(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each head's block of columns (an o_proj weight) times ``H``."""
    return (w.reshape(w.shape[0], -1, h.shape[0]) @ h).reshape(w.shape)


def rotate_value_heads(graph: Graph) -> int:
    """Fold a per-head Hadamard rotation into every qualifying v_proj/o_proj pair, in place; returns the count.

    ``v_proj``'s rows (and bias) of each KV head are multiplied by ``H^T``, ``o_proj``'s columns of each
    query head by ``H``: every query head sharing a KV head reads the same rotated values, so GQA needs
    nothing more.  Computed in float64 and stored in the weights' own dtype.
    """
    triples = rotatable_heads(graph)
    for att, v_proj, o_proj in triples:
        h = hadamard(att.attrs["head_dim"])
        for role in ("weight", "bias"):
            if role in v_proj.params:
                _transform(graph, v_proj.params[role], partial(_head_rows, h))
        _transform(graph, o_proj.params["weight"], partial(_head_columns, h))
    if triples:
        log.info("rotated the values of %d attention layers (per-head Hadamard, folded into v_proj/o_proj)",
                 len(triples))
    return len(triples)


class NotRotatable(Exception):
    """Why a graph's residual stream cannot take a folded rotation (the pass reports it and goes on)."""


def _param_users(graph: Graph) -> dict[str, set[str]]:
    """Parameter name → the nodes that read it."""
    users: dict[str, set[str]] = {}
    for node in graph.nodes():
        for pname in node.params.values():
            users.setdefault(pname, set()).add(node.name)
    return users


def _transform(graph: Graph, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace parameter ``name`` by ``fn`` of it, computed in float64 and stored in its own dtype."""
    w = materialize(graph.params[name])
    graph.params[name] = fn(w.double()).to(w.dtype).contiguous()


def _require_float(graph: Graph, node: Node, role: str = "weight") -> None:
    if isinstance(graph.params[node.params[role]], QuantizedWeight):
        raise NotRotatable(f"{node.name}'s {role} is already quantized")


def _residual_stream(graph: Graph) -> tuple[Node, list[Node], list[Node]]:
    """The token embedding, the RMSNorms reading the residual stream and the Linears writing into it.

    Walks from the embedding along residual Adds and constant multipliers (``Scale``: Gemma's embedding scale,
    Granite's multipliers, which commute with a rotation); anything else reading the stream (a LayerNorm, a MoE,
    a norm between a branch and its Add, a graph output) means a rotation would not fold exactly, and
    NotRotatable says which node.
    """
    embeddings = graph.nodes("Embedding")
    if len(embeddings) != 1:
        raise NotRotatable(f"{len(embeddings)} Embedding nodes (a rotation needs one token embedding)")
    embedding = embeddings[0]
    stream, norms, writers = [Value(embedding.name, 0)], [], []
    seen: set[str] = {embedding.name}
    while stream:
        value = stream.pop()
        if value in graph.outputs.values():
            raise NotRotatable(f"{value.node} is a graph output")
        for user, _ in graph.users_of(value):
            if user in seen:
                continue
            seen.add(user)
            node = graph.node(user)
            if node.op == "RMSNorm":
                norms.append(node)
            elif node.op == "Scale":
                stream.append(Value(user, 0))
            elif node.op == "Add":
                for other in graph.inputs_of(user):
                    if other not in stream and other.node not in seen:
                        writer = graph.node(other.node)
                        while writer.op == "Scale" and len(graph.users_of(Value(writer.name, 0))) == 1:
                            writer = graph.node(graph.inputs_of(writer.name)[0].node)  # a branch multiplier
                        if writer.op != "Linear":
                            raise NotRotatable(f"{user} adds the output of {writer.name} ({writer.op}) to the stream")
                        writers.append(writer)
                        seen.add(writer.name)
                stream.append(Value(user, 0))
            else:
                raise NotRotatable(f"{user} ({node.op}) reads the residual stream")
    return embedding, norms, writers


def rotate_residual(graph: Graph, seed: int = 0) -> list[str]:
    """Fold a random-sign Hadamard rotation of the residual stream into the weights, in place.

    Returns the names of the Linears it added (the tied lm_head's final-norm matrix), which must stay in float.
    Raises NotRotatable, before changing anything, when the stream has a reader or writer that would not fold.
    """
    embedding, norms, writers = _residual_stream(graph)
    table = embedding.params["weight"]
    readers = {norm.name: [graph.node(u) for u, _ in graph.users_of(Value(norm.name, 0))] for norm in norms}
    for norm in norms:
        for reader in readers[norm.name]:
            if reader.op != "Linear":
                raise NotRotatable(f"{norm.name} feeds {reader.name} ({reader.op})")
            _require_float(graph, reader)
    for node in [embedding, *writers, *norms]:
        _require_float(graph, node)
    # each rotated tensor must have no user the rotation does not also account for (a tied table: only the lookup
    # and Linears reading a norm; a twice-rotated graph's lm_head reads the earlier rotation's matrix instead)
    users = _param_users(graph)
    allowed = {table: {embedding.name}}
    for node in [*writers, *(r for rs in readers.values() for r in rs)]:
        allowed.setdefault(node.params["weight"], set()).add(node.name)
    for pname, names in allowed.items():
        if users[pname] - names:
            other = sorted(users[pname] - names)[0]
            raise NotRotatable(f"{other} reads {pname} outside the residual stream's norms")
    hidden = graph.info(Value(embedding.name, 0)).shape[-1]
    try:
        h = hadamard(hidden)
    except ValueError as e:
        raise NotRotatable(str(e)) from e
    signs = torch.randint(0, 2, (hidden,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    q = signs[:, None] * h

    added: list[str] = []
    rotated: set[str] = set()
    for norm in norms:
        gain = materialize(graph.params[norm.params["weight"]]).double()
        tied = any(r.params["weight"] == table for r in readers[norm.name])
        if tied:  # the table must hold E Q for the lookup: the gain moves into a float Linear after the norm
            pname = graph.add_param(f"{norm.params['weight']}.rotation", (q.T @ torch.diag(gain) @ q).float())
            graph.insert_after(Value(norm.name, 0), "Linear", f"{norm.name}.rotation", params={"weight": pname})
            added.append(f"{norm.name}.rotation")
        folded = torch.ones_like(gain) if tied else gain
        for reader in readers[norm.name]:
            if reader.params["weight"] != table and reader.params["weight"] not in rotated:
                _transform(graph, reader.params["weight"], lambda w, g=folded: w * g @ q)
                rotated.add(reader.params["weight"])
        _transform(graph, norm.params["weight"], torch.ones_like)
    _transform(graph, table, lambda w: w @ q)
    for writer in writers:
        _transform(graph, writer.params["weight"], lambda w: q.T @ w)
        if "bias" in writer.params:
            _transform(graph, writer.params["bias"], lambda b: b @ q)
    graph.reinfer()
    log.info("rotated the residual stream (%d norms, %d writers; Hadamard of order %d)", len(norms), len(writers),
             hidden)
    return added
