"""Eager torch implementations of every built-in op: the numerical definition of the IR.

Kernels are plain functions registered per op name; plugins that declare new ops
register a kernel here too.  They favour clarity over speed — this is the oracle
backends and passes are checked against — and compute in the executor's dtype (fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from tokopt.errors import UnsupportedOpError
from tokopt.optimizer.interpret.activations import jittered, quantize_activations
from tokopt.optimizer.interpret.kv_quant import kv_view
from tokopt.optimizer.ir.attrs import kivi_quantized_below, uses_long_rope
from tokopt.optimizer.ir.graph import Node

if TYPE_CHECKING:
    from tokopt.optimizer.interpret.kv_cache import KVCache


class KernelWeight(Protocol):
    """A weight an executor keeps in a low-bit kernel's own layout instead of a dense tensor.

    Only Linears and Embeddings read one (the compiled session hands them out,
    :mod:`tokopt.backends.torch.lowbit`); it computes what the IR defines for them, so the kernels
    below stay the definition and the executor chooses how fast it runs.
    """

    shape: tuple[int, ...]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` for ``x`` already in the act dtype (float32 without one), accumulated in float32,
        in that dtype."""

    def quantized_matmul(self, x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
        """``quantize_activations(x, bits, block) @ weight.T`` in float32 (integer dot products, then scaled)."""

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 rows ``ids`` of the dequantized weight (an embedding lookup)."""


Weight = torch.Tensor | KernelWeight
ACT_TORCH_DTYPES = {"bfloat16": torch.bfloat16}


@dataclass
class StepContext:
    """What a kernel may need beyond its inputs: weights, positions and the cache."""

    weights: Callable[[str], Weight]
    positions: torch.Tensor  # (seq,) absolute positions of this step's tokens
    input_ids: torch.Tensor
    cache: KVCache | None
    memo: dict = field(default_factory=dict)  # per-step values shared by layers (RoPE tables)
    #: False: attention through torch's fused ``scaled_dot_product_attention`` (without softcap or sink
    #: logits; 4x faster at 512 tokens) and RMSNorm's mean square in float32.  Their sums then take an
    #: order of their own, so outputs agree with the float64 definition to ~1e-6, not bit for bit: for
    #: measuring quality over thousands of positions, never where a session is compared with the
    #: reference (parity), see :func:`softmax`.
    exact: bool = True

    def rope(self, rope: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for this step's positions, once per step (not once per layer)."""
        key = ("rope", rope_key(rope), dtype)
        if key not in self.memo:
            self.memo[key] = rope_tables(rope, self.positions, dtype)
        return self.memo[key]


Kernel = Callable[[Node, list[torch.Tensor], StepContext], torch.Tensor]
KERNELS: dict[str, Kernel] = {}


def kernel(op: str) -> Callable[[Kernel], Kernel]:
    def deco(fn: Kernel) -> Kernel:
        KERNELS[op] = fn
        return fn
    return deco


def get_kernel(op: str) -> Kernel:
    try:
        return KERNELS[op]
    except KeyError:
        raise UnsupportedOpError(f"the torch reference executor has no kernel for op {op!r}") from None


def _w(node: Node, ctx: StepContext, role: str) -> Weight | None:
    name = node.params.get(role)
    return ctx.weights(name) if name is not None else None


@kernel("Input")
def _input(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    if node.attrs["kind"] == "input_ids":
        return ctx.input_ids
    if node.attrs["kind"] == "position_ids":
        return ctx.positions.unsqueeze(0).expand(ctx.input_ids.shape[0], -1)
    raise UnsupportedOpError(f"unknown graph input kind {node.attrs['kind']!r}")


@kernel("Embedding")
def _embedding(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    table = _w(node, ctx, "weight")
    return F.embedding(ins[0], table) if isinstance(table, torch.Tensor) else table.lookup(ins[0])


# Reductions are accumulated in float64 and rounded to float32 once.  A float32 sum depends on the
# order it is taken in, and torch.compile's fused kernels take another order than ATen's: the
# results differ by an ulp, which is harmless until a later op rounds (``act_quant``), where an ulp
# can flip a code and the compiled session would drift from the reference.  Summed in float64, every
# order rounds to the same float32, so the compiled session computes the reference's bits.
def mean_square(x: torch.Tensor) -> torch.Tensor:
    """mean(x**2) over the last dimension, in float32, the same whatever order the sum is taken in."""
    return x.double().pow(2).mean(-1, keepdim=True).float()


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension in float32, the same whatever order its sum is taken in."""
    return torch.softmax(x.double(), dim=-1).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, exact: bool = True) -> torch.Tensor:
    xf = x.float()
    ms = mean_square(xf) if exact else xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(ms + eps)
    return weight * xf.to(x.dtype)


@kernel("RMSNorm")
def _rms_norm(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    return rms_norm(ins[0], _w(node, ctx, "weight"), node.attrs["eps"], ctx.exact)


@kernel("LayerNorm")
def _layer_norm(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    x, w, b = ins[0], _w(node, ctx, "weight"), _w(node, ctx, "bias")
    xd = x.double()
    centred = xd - xd.mean(-1, keepdim=True)
    y = (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + node.attrs["eps"])).to(x.dtype) * w
    return y if b is None else y + b


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, act_quant: dict | None,
           act_dtype: str | None = None) -> torch.Tensor:
    """A Linear as the IR defines it, run-time activation quantization and rounding included."""
    if act_quant is not None and not isinstance(weight, torch.Tensor):  # the kernel quantizes its own input
        return _plus(weight.quantized_matmul(x, act_quant["bits"], act_quant["block"]), bias)
    if act_quant is not None:
        x = quantize_activations(x, act_quant["bits"], act_quant["block"])
    if act_dtype is None:
        return F.linear(x, weight, bias) if isinstance(weight, torch.Tensor) else _plus(weight.matmul(x), bias)
    dtype = ACT_TORCH_DTYPES[act_dtype]
    rounded = jittered(x).to(dtype)
    if isinstance(weight, torch.Tensor):
        y = jittered(F.linear(rounded.to(x.dtype), weight)).to(dtype)
    else:
        y = weight.matmul(rounded)
    return _plus(y.to(x.dtype), bias)


def _plus(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


@kernel("Linear")
def _linear(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    return linear(ins[0], _w(node, ctx, "weight"), _w(node, ctx, "bias"), node.attrs.get("act_quant"),
                  node.attrs.get("act_dtype"))


def activation(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "relu":
        return F.relu(x)
    raise UnsupportedOpError(f"unknown activation {kind!r}")


@kernel("Activation")
def _activation(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    return activation(node.attrs["kind"], ins[0])


@kernel("Add")
def _add(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    return ins[0] + ins[1]


@kernel("Scale")
def _scale(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    return ins[0] * node.attrs["factor"]


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), as Gemma computes it (divide, then multiply)."""
    return torch.tanh(x / cap) * cap


@kernel("Softcap")
def _softcap(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    return softcap(ins[0], node.attrs["cap"])


@kernel("Mul")
def _mul(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    return ins[0] * ins[1]


def route(logits: torch.Tensor, attrs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts) of each row's top_k experts, by the MoE's ``routing``."""
    if attrs.get("routing", "softmax_topk") == "topk_softmax":  # gpt-oss: softmax over the top_k logits only
        top, experts = torch.topk(logits.float(), attrs["top_k"], dim=-1)
        return softmax(top), experts
    weights, experts = torch.topk(softmax(logits.float()), attrs["top_k"], dim=-1)
    if attrs["norm_topk_prob"]:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def gated_unit(attrs: dict, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """An expert's hidden activation from its gate and up projections (``glu``, default act(gate) * up)."""
    glu = attrs.get("glu")
    if glu is None:
        return activation(attrs["activation"], gate) * up
    limit = glu["limit"]  # clamped_swiglu (gpt-oss)
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * glu["alpha"]))


Stacked = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Biases = list[torch.Tensor | None]


def _routed_by_expert(a: dict, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                      stacked: Stacked, biases: Biases) -> torch.Tensor:
    """The routed experts' sum, one expert at a time over the rows that chose it (eager: reads each expert once)."""
    gate, up, down = stacked

    def bias(j: int, e: int) -> torch.Tensor | None:
        return None if biases[j] is None else biases[j][e]

    out = torch.zeros_like(flat)
    for e in torch.unique(experts).tolist():
        rows, slot = torch.nonzero(experts == e, as_tuple=True)
        h = flat[rows]
        g, u = F.linear(h, gate[e], bias(0, e)), F.linear(h, up[e], bias(1, e))
        y = F.linear(gated_unit(a, g, u), down[e], bias(2, e))
        out.index_add_(0, rows, y * weights[rows, slot, None])
    return out


def _routed_gathered(a: dict, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                     stacked: Stacked, biases: Biases) -> torch.Tensor:
    """The same sum with each row's top_k experts gathered: no data-dependent loop, so a compiled decode step
    keeps one graph whichever experts the tokens choose (the per-expert loop's trip count is data)."""
    gate, up, down = stacked

    def proj(w: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, spec: str) -> torch.Tensor:
        y = torch.einsum(spec, x, w[experts])
        return y if bias is None else y + bias[experts]

    g, u = proj(gate, biases[0], flat, "nh,nkih->nki"), proj(up, biases[1], flat, "nh,nkih->nki")
    y = proj(down, biases[2], gated_unit(a, g, u), "nki,nkhi->nkh")
    return (y * weights[..., None]).sum(dim=1)


@kernel("MoE")
def _moe(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    a = node.attrs
    x = ins[0]
    flat = x.reshape(-1, x.shape[-1])
    weights, experts = route(F.linear(flat, _w(node, ctx, "router"), _w(node, ctx, "router_bias")), a)
    weights = weights.to(x.dtype)
    gate, up, down = (_w(node, ctx, r) for r in ("experts.gate", "experts.up", "experts.down"))
    biases = [_w(node, ctx, r) for r in ("experts.gate_bias", "experts.up_bias", "experts.down_bias")]

    if torch.compiler.is_compiling():
        out = _routed_gathered(a, flat, weights, experts, (gate, up, down), biases)
    else:
        out = _routed_by_expert(a, flat, weights, experts, (gate, up, down), biases)
    if "shared.gate" in node.params:
        gate = activation(a["activation"], F.linear(flat, _w(node, ctx, "shared.gate")))
        h = gate * F.linear(flat, _w(node, ctx, "shared.up"))
        shared = F.linear(h, _w(node, ctx, "shared.down"))
        if a.get("shared_gate"):
            shared = torch.sigmoid(F.linear(flat, _w(node, ctx, "shared_gate"))) * shared
        out = out + shared
    return out.reshape(x.shape)


def rope_tables(rope: dict, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (seq, rotary_dim) for absolute ``positions`` (HF half-rotation layout).

    LongRoPE picks its frequency set for the whole step from the step's largest position
    (:func:`~tokopt.optimizer.ir.attrs.uses_long_rope`), branch-free so a compiled step keeps one graph."""
    inv_freq = torch.tensor(rope["inv_freq"], dtype=torch.float32)
    if uses_long_rope(rope):
        long = positions.max() + 1 > rope["original_max_positions"]
        inv_freq = torch.where(long, torch.tensor(rope["long_inv_freq"], dtype=torch.float32), inv_freq)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    factor = rope.get("attention_factor", 1.0)
    return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def rope_key(rope: dict) -> tuple:
    """Layers whose RoPE has the same frequencies and scaling share one cos/sin table."""
    return (tuple(rope["inv_freq"]), rope.get("attention_factor", 1.0), tuple(rope.get("long_inv_freq") or ()),
            rope.get("original_max_positions"))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` features of x (batch, heads, seq, dim)."""
    rd = cos.shape[-1]
    xr, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, rest], dim=-1)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, attrs: dict,
                   k_quantized: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (q, k) mask: causal, then sliding window keeping the first ``sinks`` positions.

    A key position of ``-1`` marks a cache slot not written yet: it is never attended to.
    ``k_quantized`` (a KIVI cache, ``kv_cache.quant.key_axis == "channel"``) marks the slots holding a
    position's dequantized copy; the others hold its full-precision copy.  A query at ``t`` sees the
    dequantized copy of positions below ``kivi_quantized_below(t, G, R)`` and the full-precision copy of
    the rest, so exactly one copy of each position survives the mask.
    """
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0 if attrs.get("causal", True) else torch.ones_like(diff, dtype=torch.bool)
    window = attrs.get("window")
    if window:
        in_window = diff < window
        sinks = int(attrs.get("sinks") or 0)
        if sinks:
            in_window = in_window | (k_pos[None, :] < sinks)
        allowed = allowed & in_window
    if k_quantized is not None:
        q = attrs["kv_cache"]["quant"]
        below = kivi_quantized_below(q_pos, q["token_group"], q["residual"])[:, None]
        allowed = allowed & torch.where(k_quantized[None, :], k_pos[None, :] < below, k_pos[None, :] >= below)
    return allowed & (k_pos >= 0)[None, :]


@kernel("Attention")
def _attention(node: Node, ins: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
    a = node.attrs
    q, k, v = ins
    bsz, seq, _ = q.shape
    h, kvh, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    q = q.view(bsz, seq, h, d).transpose(1, 2)
    k = k.view(bsz, seq, kvh, d).transpose(1, 2)
    v = v.view(bsz, seq, kvh, d).transpose(1, 2)
    if a.get("qk_norm"):
        q = rms_norm(q, _w(node, ctx, "q_norm"), a["qk_norm"]["eps"], ctx.exact)
        k = rms_norm(k, _w(node, ctx, "k_norm"), a["qk_norm"]["eps"], ctx.exact)
    if a.get("rope"):
        cos, sin = ctx.rope(a["rope"], q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if ctx.cache is None:  # no store: attention reads what a cache of this kv_cache dtype would hold
        k, v, k_pos, k_quantized = kv_view(k, v, ctx.positions, a["kv_cache"])
    else:  # the one cache interface: layer(name, attrs).append(k, v, positions) -> k, v, positions
        layer = ctx.cache.layer(node.name, a)  # the node's window/sinks/kv_cache shape (and encode) the store
        layer.append(k, v, ctx.positions)
        k, v, k_pos, k_quantized = layer.k, layer.v, layer.positions, layer.quantized
    if not ctx.exact and not a.get("softcap") and _w(node, ctx, "sink_logits") is None:
        mask = attention_mask(ctx.positions, k_pos, a, k_quantized)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a["scale"], enable_gqa=True)
        return out.transpose(1, 2).reshape(bsz, seq, h * d)
    # grouped-query attention without repeating K/V: each kv head's query group becomes rows
    group = h // kvh
    scores = (q.reshape(bsz, kvh, group * seq, d) @ k.transpose(-1, -2)) * a["scale"]
    if a.get("softcap"):
        scores = softcap(scores, a["softcap"])
    mask = attention_mask(ctx.positions, k_pos, a, k_quantized).repeat(group, 1)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = _w(node, ctx, "sink_logits")
    if sink is not None:  # one more logit per head that attends to nothing (gpt-oss): it only joins the softmax
        column = sink.view(1, kvh, group, 1, 1).expand(bsz, kvh, group, seq, 1).reshape(bsz, kvh, group * seq, 1)
        probs = softmax(torch.cat([scores, column.to(scores.dtype)], dim=-1).float())[..., :-1]
        probs = probs.to(q.dtype)
    else:
        probs = softmax(scores.float()).to(q.dtype)
    out = (probs @ v).view(bsz, h, seq, d)
    return out.transpose(1, 2).reshape(bsz, seq, h * d)
