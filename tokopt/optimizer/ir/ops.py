"""Op kinds of the IR, each declared once: schema, shape inference and cost model.

An :class:`OpSpec` says what an op consumes and produces, which attributes it takes
(with defaults), which parameters it owns, how to infer its output types, and what it
costs per decoded token.  Plugins declare new ops with :func:`register_op`; every
consumer (verifier, executor, backends, reports) looks ops up here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokopt.errors import UnsupportedOpError
from tokopt.optimizer.ir.weights import DTYPE_BYTES, weight_nbytes, weight_shape

if TYPE_CHECKING:
    from tokopt.optimizer.ir.graph import Graph, Node, TensorInfo

InferFn = Callable[["Node", list["TensorInfo"], "Graph"], list["TensorInfo"]]
CostFn = Callable[["Node", "Graph", int], int]


@dataclass(frozen=True)
class OpSpec:
    """Declaration of one op kind.

    ``flops`` returns forward FLOPs for one token whose KV context holds ``context``
    tokens.  ``bytes_read`` returns parameter bytes one decoded token reads (an
    embedding reads one row; an MoE reads only its routed experts).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    params: tuple[str, ...]
    infer: InferFn
    flops: CostFn
    doc: str
    optional_params: tuple[str, ...] = ()
    bytes_read: CostFn | None = None
    variadic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_OPS: dict[str, OpSpec] = {}
_RESOLVERS: list[Callable[[set[str]], None]] = []


def add_op_resolver(resolver: Callable[[set[str]], None]) -> None:
    """Register who can declare ops the IR does not know yet (the plugin layer: plugin ops).

    The IR cannot import the plugins that sit above it; they register here instead, and
    :func:`ensure_ops` asks them before a graph naming such ops is read.
    """
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def ensure_ops(names: set[str]) -> None:
    """Ask the registered resolvers to declare any of ``names`` that is not declared yet."""
    for resolver in _RESOLVERS:
        missing = names - set(_OPS)
        if not missing:
            return
        resolver(missing)


def register_op(spec: OpSpec, *, replace: bool = False) -> None:
    if spec.name in _OPS and not replace:
        raise ValueError(f"op {spec.name!r} is already declared")
    _OPS[spec.name] = spec


def get_op(name: str) -> OpSpec:
    try:
        return _OPS[name]
    except KeyError:
        raise UnsupportedOpError(f"unknown op {name!r}; declared ops: {', '.join(sorted(_OPS))}") from None


def all_ops() -> dict[str, OpSpec]:
    return dict(_OPS)


def param_bytes(node: Node, graph: Graph, _context: int = 0) -> int:
    return sum(weight_nbytes(graph.params[p]) for p in node.params.values())


def _info(shape: tuple[int, ...], dtype: str = "float32") -> TensorInfo:
    from tokopt.optimizer.ir.graph import TensorInfo

    return TensorInfo(tuple(shape), dtype)


def _zero(_node: Node, _graph: Graph, _context: int = 0) -> int:
    return 0


def _same_as_first(node: Node, ins: list[TensorInfo], graph: Graph) -> list[TensorInfo]:
    return [ins[0]]


def _elementwise_flops(node: Node, graph: Graph, context: int = 0) -> int:
    return math.prod(node.outputs[0].shape)


# -- Input ----------------------------------------------------------------------------
register_op(OpSpec(
    "Input", (), ("value",), {"kind": "input_ids"}, (),
    lambda n, ins, g: [_info((), "int64")], _zero,
    "A graph input: token ids or position ids, shape (batch, seq).",
))


# -- Embedding ------------------------------------------------------------------------
def _embedding_infer(node: Node, ins: list[TensorInfo], graph: Graph) -> list[TensorInfo]:
    return [_info((weight_shape(graph.params[node.params["weight"]])[1],))]


def _embedding_bytes(node: Node, graph: Graph, _context: int = 0) -> int:
    w = graph.params[node.params["weight"]]
    return weight_nbytes(w) // weight_shape(w)[0]


register_op(OpSpec(
    "Embedding", ("ids",), ("out",), {}, ("weight",), _embedding_infer, _zero,
    "Row lookup in a (num_embeddings, dim) table; used for tokens and learned positions.",
    bytes_read=_embedding_bytes,
))


# -- Norms ----------------------------------------------------------------------------
register_op(OpSpec(
    "RMSNorm", ("x",), ("out",), {"eps": 1e-6}, ("weight",), _same_as_first,
    lambda n, g, c=0: 4 * n.outputs[0].shape[-1],
    "x / sqrt(mean(x^2) + eps) * weight, over the last dimension.",
))
register_op(OpSpec(
    "LayerNorm", ("x",), ("out",), {"eps": 1e-5}, ("weight",), _same_as_first,
    lambda n, g, c=0: 8 * n.outputs[0].shape[-1],
    "(x - mean) / sqrt(var + eps) * weight + bias, over the last dimension.",
    optional_params=("bias",),
))


# -- Linear ---------------------------------------------------------------------------
def _linear_infer(node: Node, ins: list[TensorInfo], graph: Graph) -> list[TensorInfo]:
    out_f, _ = weight_shape(graph.params[node.params["weight"]])
    return [_info((out_f,))]


def _linear_flops(node: Node, graph: Graph, _context: int = 0) -> int:
    out_f, in_f = weight_shape(graph.params[node.params["weight"]])
    return 2 * out_f * in_f + (out_f if "bias" in node.params else 0)


register_op(OpSpec(
    "Linear", ("x",), ("out",), {"act_quant": None, "act_dtype": None}, ("weight",), _linear_infer,
    _linear_flops,
    "y = x @ weight.T + bias; weight is (out_features, in_features), dense or quantized.  act_quant "
    "{'bits': 8, 'block': B} first quantizes x per block of B columns (tokopt.optimizer.interpret.activations); "
    "act_dtype 'bfloat16' rounds x, and x @ weight.T before the bias, to bfloat16 (tokopt.optimizer.ir.attrs).",
    optional_params=("bias",),
))


# -- Activation and elementwise ---------------------------------------------------------
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
register_op(OpSpec(
    "Activation", ("x",), ("out",), {"kind": "silu"}, (), _same_as_first, _elementwise_flops,
    f"Pointwise nonlinearity; kind is one of {', '.join(ACTIVATIONS)}.",
))
register_op(OpSpec("Mul", ("a", "b"), ("out",), {}, (), _same_as_first, _elementwise_flops,
                   "Elementwise product."))
register_op(OpSpec("Add", ("a", "b"), ("out",), {}, (), _same_as_first, _elementwise_flops,
                   "Elementwise sum (residual connections)."))
register_op(OpSpec(
    "Scale", ("x",), ("out",), {"factor": 1.0}, (), _same_as_first, _elementwise_flops,
    "x * factor, a constant multiplier: Gemma's sqrt(hidden) embedding scale, Granite's embedding, residual "
    "and logit multipliers.  Kept as a node (not folded into a weight) because the weight it follows is often "
    "tied to another use (the embedding is also the lm_head).",
))
register_op(OpSpec(
    "Softcap", ("x",), ("out",), {"cap": None}, (), _same_as_first, lambda n, g, c=0: 3 * math.prod(n.outputs[0].shape),
    "cap * tanh(x / cap): Gemma 2's final-logit soft-capping (attention logits carry their own softcap).",
))


# -- Attention ------------------------------------------------------------------------
DEFAULT_KV_CACHE = {
    "layout": "BNSH",  # cache tensor layout: batch, kv heads, sequence, head dim
    "dtype": "float32",  # element type of cached K/V
    "storage": "dynamic",  # dynamic (grows), static (pre-allocated max_len), paged
    "block_size": None,  # tokens per page when paged
    "scale_bytes_per_token": 0,  # quantization scales stored per cached token (all heads, K+V)
}


def _attention_infer(node: Node, ins: list[TensorInfo], graph: Graph) -> list[TensorInfo]:
    a = node.attrs
    return [_info((a["num_heads"] * a["head_dim"],))]


def _attention_flops(node: Node, graph: Graph, context: int = 1) -> int:
    a = node.attrs
    span = attended_span(a, context)
    # QK^T and PV: 2 * 2 * heads * head_dim * span
    return 4 * a["num_heads"] * a["head_dim"] * span


def attended_span(attrs: dict[str, Any], context: int) -> int:
    """Keys one query at position ``context - 1`` attends to (window- and sink-aware)."""
    window = attrs.get("window")
    if not window:
        return context
    return min(context, window + int(attrs.get("sinks") or 0))


def kv_bytes_per_token(attrs: dict[str, Any]) -> float:
    """Bytes one cached token costs in this attention layer (K and V, all KV heads).

    Codes plus ``scale_bytes_per_token`` (for a KIVI cache, keys' per-channel scale/min spread over their
    token block).  A KIVI cache's full-precision ring (``residual + token_group`` slots per sequence) is a
    constant, not a per-token cost: :func:`~tokopt.optimizer.ir.kv_memory.reserved_kv_bytes` adds it."""
    cache = attrs["kv_cache"]
    elem = DTYPE_BYTES[cache["dtype"]]
    return 2 * attrs["num_kv_heads"] * attrs["head_dim"] * elem + cache.get("scale_bytes_per_token", 0)


register_op(OpSpec(
    "Attention", ("q", "k", "v"), ("out",),
    {
        "num_heads": None, "num_kv_heads": None, "head_dim": None, "scale": None,
        "rope": None,  # {"theta", "type", "rotary_dim", "interleaved", "inv_freq", "attention_factor"}
        #               + LongRoPE's {"long_inv_freq", "original_max_positions"}
        "qk_norm": None,  # {"eps"} when q_norm/k_norm params normalise each head
        "causal": True, "window": None, "sinks": 0, "softcap": None,
        "kv_cache": DEFAULT_KV_CACHE, "layer_index": 0,
    },
    (), _attention_infer, _attention_flops,
    "Scaled dot-product attention over projected q (heads*head_dim), k and v (kv_heads*head_dim), "
    "with RoPE, optional per-head q/k RMSNorm, causal mask, sliding window with sink tokens, "
    "logit softcap, and a KV cache described by kv_cache.  The optional sink_logits param (num_heads,) is "
    "gpt-oss's learned attention sink: one extra logit per head in the softmax's denominator, attending to "
    "nothing (not the same thing as the window's `sinks`, which keep the first tokens).",
    optional_params=("q_norm", "k_norm", "sink_logits"),
))


# -- MoE ------------------------------------------------------------------------------
def _moe_flops(node: Node, graph: Graph, _context: int = 0) -> int:
    a = node.attrs
    hidden, inter = a["hidden_size"], a["intermediate_size"]
    flops = 2 * hidden * a["num_experts"] + a["top_k"] * 3 * 2 * hidden * inter
    if a.get("shared_intermediate_size"):
        flops += 3 * 2 * hidden * a["shared_intermediate_size"] + 2 * hidden
    return flops


def _moe_bytes(node: Node, graph: Graph, _context: int = 0) -> int:
    a = node.attrs
    total = 0
    for role, pname in node.params.items():
        nbytes = weight_nbytes(graph.params[pname])
        if role.startswith("experts."):
            nbytes = nbytes * a["top_k"] // a["num_experts"]
        total += nbytes
    return total


register_op(OpSpec(
    "MoE", ("x",), ("out",),
    {"num_experts": None, "top_k": None, "hidden_size": None, "intermediate_size": None,
     "norm_topk_prob": True, "activation": "silu", "shared_intermediate_size": None,
     "shared_gate": False, "routing": "softmax_topk", "glu": None},
    ("router", "experts.gate", "experts.up", "experts.down"),
    _same_as_first, _moe_flops,
    "Top-k routed mixture of gated-MLP experts: router logits (+ router_bias), routing 'softmax_topk' "
    "(softmax over all experts, top_k kept, renormalised when norm_topk_prob) or 'topk_softmax' (top_k "
    "logits, softmax over them: gpt-oss), experts stacked as (E, I, H) gate/up and (E, H, I) down with "
    "optional (E, I)/(E, H) biases, act(gate) * up — or, with glu {'kind': 'clamped_swiglu', 'alpha', "
    "'limit'}, gpt-oss's (clamp(up, ±limit) + 1) * g * sigmoid(alpha * g) where g = min(gate, limit) — "
    "and an optional shared expert (shared.gate/up/down) scaled by sigmoid(shared_gate).",
    optional_params=("shared.gate", "shared.up", "shared.down", "shared_gate", "router_bias",
                     "experts.gate_bias", "experts.up_bias", "experts.down_bias"),
    bytes_read=_moe_bytes,
))
