"""Attention: ``com.microsoft::GroupQueryAttention`` where it fits, standard ops otherwise.

GroupQueryAttention (CPU, fp32) applies RoPE itself from cos/sin caches and writes new K/V
into a shared past/present buffer of ``max_length`` slots.  Layers it cannot express —
sliding windows (its buffer would keep every token), sink tokens, a KV cache dtype other
than the activations', partial rotary, head sizes that are not a multiple of 16 (8 without
rotary) — are lowered with standard ops instead: the same semantics, never a dropped attribute.

With standard ops a full-attention layer's cache grows by concatenation; a layer with a
window keeps a ring of ``sinks + window`` slots, as the reference's bounded cache does
(:mod:`tokopt.optimizer.interpret.kv_cache`): sinks in slots ``[0, sinks)``, position ``p``
beyond them in slot ``sinks + (p - sinks) % window``, keys cached after RoPE at their original
positions.  Which position a slot holds is a function of the tokens seen so far (the length
of ``attention_mask``), so the ring needs no extra model inputs, and masks are computed from
the slots' positions exactly as :func:`~tokopt.optimizer.interpret.kernels.attention_mask` does.
A step attends to the old slots plus its own tokens (a chunk's first queries need keys the ring
is about to evict), then ``present`` keeps the ring's ``min(total, sinks + window)`` slots.
"""

from __future__ import annotations

import numpy as np
import torch

from tokopt.backends.onnxruntime.lower import KVSlot, LowerContext
from tokopt.backends.onnxruntime.ops import register_lowering
from tokopt.backends.onnxruntime.ops.basic import rms_norm, softcap
from tokopt.errors import UnsupportedOpError
from tokopt.optimizer.interpret.kernels import rope_key
from tokopt.optimizer.ir.attrs import uses_long_rope
from tokopt.optimizer.ir.graph import Node

KV_DTYPES = ("float32",)
_NEG = float(np.finfo(np.float32).min)  # finite: a fully masked (padded) row stays NaN-free


def gqa_unsupported_reason(node: Node) -> str | None:
    """Why GroupQueryAttention cannot run this attention node faithfully (None: it can)."""
    a = node.attrs
    rope = a.get("rope")
    d = a["head_dim"]
    if a.get("sinks"):
        return f"{node.name}: sink tokens (GroupQueryAttention's local window has no sinks)"
    if "sink_logits" in node.params:
        return f"{node.name}: learned attention-sink logits (lowered as an extra softmax column)"
    if a.get("window"):
        return f"{node.name}: a sliding window (GroupQueryAttention's buffer keeps every token, a ring the window)"
    if not a.get("causal", True):
        return f"{node.name}: non-causal attention"
    if a["kv_cache"]["dtype"] != "float32":
        return f"{node.name}: a {a['kv_cache']['dtype']} KV cache (GroupQueryAttention's fp32 cache is float32)"
    if rope and (rope["rotary_dim"] != d or rope.get("interleaved")):
        return f"{node.name}: partial or interleaved rotary embedding"
    if d % (16 if rope else 8):
        return f"{node.name}: head_dim {d} is not a multiple of {16 if rope else 8}"
    return None


def _kv_slot(ctx: LowerContext, node: Node) -> KVSlot:
    a = node.attrs
    dtype = a["kv_cache"]["dtype"]
    if dtype not in KV_DTYPES:
        raise UnsupportedOpError(f"{node.name}: KV cache dtype {dtype!r} is not supported by the onnxruntime "
                                 f"backend; supported: {', '.join(KV_DTYPES)}")
    slot = KVSlot(node.name, len(ctx.kv), a["num_kv_heads"], a["head_dim"], dtype)
    ctx.kv.append(slot)
    return slot


def rope_table(ctx: LowerContext, rope: dict, half: bool) -> tuple[str, str]:
    """cos/sin tables (max_length, rotary_dim or rotary_dim/2), attention factor folded in.

    LongRoPE stores both frequency sets' tables and picks one per step, as the reference does: the long one
    once the step reaches past ``original_max_positions`` (the step's tokens end at the attention mask's width).
    """
    key = ("rope", rope_key(rope), half)
    if key not in ctx.cache:
        idx = sum(1 for k in ctx.cache if isinstance(k, tuple) and k[0] == "rope")
        tables = _rope_tables(ctx, rope["inv_freq"], rope.get("attention_factor", 1.0), half, f"rope{idx}")
        if uses_long_rope(rope):
            long = _rope_tables(ctx, rope["long_inv_freq"], rope.get("attention_factor", 1.0), half, f"rope{idx}.long")
            _, total = _lengths(ctx)
            past = ctx.b.op("Greater", [total, ctx.b.const(int(rope["original_max_positions"]))],
                            name=f"rope{idx}.is_long")
            tables = tuple(ctx.b.op("Where", [past, lt, st], name=f"rope{idx}.table")
                           for lt, st in zip(long, tables, strict=True))
        ctx.cache[key] = tables
    return ctx.cache[key]


def _rope_tables(ctx: LowerContext, inv_freq: list[float], factor: float, half: bool, name: str) -> tuple[str, str]:
    freqs = torch.arange(ctx.max_length).float()[:, None] * torch.tensor(inv_freq, dtype=torch.float32)[None, :]
    emb = freqs if half else torch.cat([freqs, freqs], dim=-1)
    return (ctx.b.initializer(f"{name}.cos_cache", (emb.cos() * factor).numpy()),
            ctx.b.initializer(f"{name}.sin_cache", (emb.sin() * factor).numpy()))


def _qk_norm(ctx: LowerContext, node: Node, x: str, heads: int, role: str) -> str:
    """Per-head RMSNorm of a (B, S, heads*D) projection; returns (B, S, heads, D)."""
    b, d = ctx.b, node.attrs["head_dim"]
    x4 = b.op("Reshape", [x, b.const([0, 0, heads, d])], name=f"{node.name}/{role}_heads")
    if node.attrs.get("qk_norm"):
        x4 = rms_norm(ctx, x4, ctx.weight_init(node.params[f"{role}_norm"]), node.attrs["qk_norm"]["eps"],
                      f"{node.name}/{role}_norm")
    return x4


@register_lowering("Attention")
def lower_attention(ctx: LowerContext, node: Node, inputs: list[str]) -> list[str]:
    if ctx.attention_mode == "gqa":
        return _gqa(ctx, node, inputs)
    return _decomposed(ctx, node, inputs)


# -- GroupQueryAttention ------------------------------------------------------------------
def _gqa_lengths(ctx: LowerContext) -> tuple[str, str]:
    """seqlens_k (total length − 1 per row, int32) and total_sequence_length (int32 scalar)."""
    if "gqa_lengths" not in ctx.cache:
        b = ctx.b
        total = b.op("ReduceSum", ["attention_mask", b.const([1])], keepdims=0, name="seqlens")
        seqlens = b.op("Cast", [b.op("Sub", [total, b.const(1)])], to=6, name="seqlens_k")
        tsl = b.op("Cast", [b.op("Squeeze", [ctx.shape_dim("attention_mask", 1), b.const([0])])], to=6,
                   name="total_seq_len")
        ctx.cache["gqa_lengths"] = (seqlens, tsl)
    return ctx.cache["gqa_lengths"]


def _gqa(ctx: LowerContext, node: Node, inputs: list[str]) -> list[str]:
    a, b = node.attrs, ctx.b
    h, kvh, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    q, k, v = inputs
    if a.get("qk_norm"):
        q = b.op("Reshape", [_qk_norm(ctx, node, q, h, "q"), b.const([0, 0, h * d])])
        k = b.op("Reshape", [_qk_norm(ctx, node, k, kvh, "k"), b.const([0, 0, kvh * d])])
    slot = _kv_slot(ctx, node)
    seqlens, tsl = _gqa_lengths(ctx)
    packed = ctx.cache.get(("packed_qkv", node.name))
    if packed is not None:
        q, k, v = packed, "", ""
    ins = [q, k, v, f"past_key_values.{slot.index}.key", f"past_key_values.{slot.index}.value", seqlens, tsl]
    rope = a.get("rope")
    if rope:
        ins += list(rope_table(ctx, rope, half=True))
    out, _, _ = b.ms("GroupQueryAttention", ins,
                     outputs=[b.fresh(f"{node.name}/out"), f"present.{slot.index}.key", f"present.{slot.index}.value"],
                     num_heads=h, kv_num_heads=kvh, scale=float(a["scale"]), do_rotary=int(bool(rope)),
                     rotary_interleaved=0, softcap=float(a["softcap"]) if a.get("softcap") else None, name=node.name)
    return [out]


# -- standard ops ----------------------------------------------------------------------------
def _lengths(ctx: LowerContext) -> tuple[str, str]:
    """(tokens seen before this step, tokens seen after it) as int64 scalars."""
    if "lengths" not in ctx.cache:
        b = ctx.b
        total = b.op("Squeeze", [ctx.shape_dim("attention_mask", 1), b.const([0])], name="total_len")
        seq = b.op("Squeeze", [ctx.shape_dim("input_ids", 1), b.const([0])])
        ctx.cache["lengths"] = (b.op("Sub", [total, seq], name="past_len"), total)
    return ctx.cache["lengths"]


def _ring_positions(ctx: LowerContext, slots: str, seen: str, window: int, sinks: int) -> str:
    """The position each ring slot holds after ``seen`` tokens: the latest ``p < seen`` that maps to it."""
    b = ctx.b
    last = b.op("Sub", [seen, b.const(1)])
    latest = b.op("Sub", [last, b.op("Mod", [b.op("Sub", [last, slots]), b.const(window)])])
    return b.op("Where", [b.op("Less", [slots, b.const(sinks)]), slots, latest], name="ring_positions")


def _ring(ctx: LowerContext, window: int, sinks: int, past: str) -> tuple[str, str]:
    """(positions of this step's keys: old slots then new tokens, ``present``'s gather indices into them).

    ``past`` is one layer's past key, whose length is the number of occupied slots; every
    layer with this window and these sinks shares the result.
    """
    key = ("ring", window, sinks)
    if key not in ctx.cache:
        b = ctx.b
        before, total = _lengths(ctx)
        held = b.op("Squeeze", [b.op("Shape", [past], start=2, end=3), b.const([0])], name="ring_held")
        old = _ring_positions(ctx, b.op("Range", [b.const(0), held, b.const(1)]), before, window, sinks)
        k_pos = b.op("Concat", [old, b.op("Range", [before, total, b.const(1)])], axis=0, name="ring_key_positions")
        keep = b.op("Min", [total, b.const(sinks + window)])
        slots = b.op("Range", [b.const(0), keep, b.const(1)])
        pos = _ring_positions(ctx, slots, total, window, sinks)
        fresh = b.op("Add", [held, b.op("Sub", [pos, before])])  # a new token's index in old + new
        index = b.op("Where", [b.op("GreaterOrEqual", [pos, before]), fresh, slots], name="ring_index")
        ctx.cache[key] = (k_pos, index)
    return ctx.cache[key]


def _mask(ctx: LowerContext, a: dict, k_pos: str) -> str:
    """Additive (B, 1, 1, S, K) mask over keys at positions ``k_pos``: causal, window, sinks and the
    padding in attention_mask (indexed by position), as the reference's ``attention_mask``."""
    window, sinks, causal = a.get("window"), int(a.get("sinks") or 0), bool(a.get("causal", True))
    key = ("mask", k_pos, window, sinks, causal)
    if key in ctx.cache:
        return ctx.cache[key]
    b = ctx.b
    before, total = _lengths(ctx)
    q_pos = b.op("Range", [before, total, b.const(1)], name="q_positions")
    diff = b.op("Sub", [b.op("Unsqueeze", [q_pos, b.const([1])]), b.op("Unsqueeze", [k_pos, b.const([0])])])
    if causal:
        allowed = b.op("GreaterOrEqual", [diff, b.const(0)])
    else:
        allowed = b.op("Expand", [b.const(True, "bool"), b.op("Shape", [diff])])
    if window:
        in_window = b.op("Less", [diff, b.const(int(window))])
        if sinks:
            in_window = b.op("Or", [in_window, b.op("Unsqueeze", [b.op("Less", [k_pos, b.const(sinks)]),
                                                                   b.const([0])])])
        allowed = b.op("And", [allowed, in_window])
    padding = b.op("Gather", ["attention_mask", k_pos], axis=1)
    padding = b.op("Cast", [b.op("Unsqueeze", [padding, b.const([1, 2, 3])])], to=9)  # (B,1,1,1,K)
    allowed = b.op("And", [padding, allowed])
    mask = b.op("Where", [allowed, b.const(0.0, "float32"), b.const(_NEG, "float32")], name="attn_mask")
    ctx.cache[key] = mask
    return mask


def _key_positions(ctx: LowerContext) -> str:
    """Positions of a growing cache's keys: slot = position."""
    if "key_positions" not in ctx.cache:
        _, total = _lengths(ctx)
        ctx.cache["key_positions"] = ctx.b.op("Range", [ctx.b.const(0), total, ctx.b.const(1)], name="key_positions")
    return ctx.cache["key_positions"]


def _rope_bshd(ctx: LowerContext, x: str, rope: dict, head_dim: int, name: str) -> str:
    """Rotate the first rotary_dim features of x (B, S, heads, D), HF half-rotation layout."""
    b = ctx.b
    key = ("rope_gathered", rope_key(rope))
    if key not in ctx.cache:
        cos_t, sin_t = rope_table(ctx, rope, half=False)
        pos = ctx.position_ids()
        ctx.cache[key] = tuple(b.op("Unsqueeze", [b.op("Gather", [t, pos], axis=0), b.const([2])], name="rope")
                               for t in (cos_t, sin_t))
    cos, sin = ctx.cache[key]
    rd = rope["rotary_dim"]
    half = rd // 2
    x_rot = x if rd == head_dim else b.op("Slice", [x, b.const([0]), b.const([rd]), b.const([-1])])
    x1 = b.op("Slice", [x_rot, b.const([0]), b.const([half]), b.const([-1])])
    x2 = b.op("Slice", [x_rot, b.const([half]), b.const([rd]), b.const([-1])])
    rotated = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    out = b.op("Add", [b.op("Mul", [x_rot, cos]), b.op("Mul", [rotated, sin])], name=name)
    return out


def _decomposed(ctx: LowerContext, node: Node, inputs: list[str]) -> list[str]:
    a, b = node.attrs, ctx.b
    h, kvh, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    rep = h // kvh
    q4 = _qk_norm(ctx, node, inputs[0], h, "q")  # (B, S, H, D)
    k4 = _qk_norm(ctx, node, inputs[1], kvh, "k")
    v4 = b.op("Reshape", [inputs[2], b.const([0, 0, kvh, d])])
    rope = a.get("rope")
    if rope:
        rd = rope["rotary_dim"]
        if rd == d:
            q4 = _rope_bshd(ctx, q4, rope, d, f"{node.name}/q_rope")
            k4 = _rope_bshd(ctx, k4, rope, d, f"{node.name}/k_rope")
        else:
            parts = []
            for x in (q4, k4):
                rest = b.op("Slice", [x, b.const([rd]), b.const([d]), b.const([-1])])
                parts.append(b.op("Concat", [_rope_bshd(ctx, x, rope, d, f"{node.name}/rope"), rest], axis=-1))
            q4, k4 = parts
    slot = _kv_slot(ctx, node)
    window = a.get("window")
    past = {kind: f"past_key_values.{slot.index}.{kind}" for kind in ("key", "value")}
    if window:
        k_pos, index = _ring(ctx, int(window), int(a.get("sinks") or 0), past["key"])
    else:
        k_pos = _key_positions(ctx)
    present = []
    for x, kind in ((k4, "key"), (v4, "value")):
        new = b.op("Transpose", [x], perm=[0, 2, 1, 3])  # (B, kvh, S, D)
        name = f"present.{slot.index}.{kind}"
        cat = b.op("Concat", [past[kind], new], axis=2, outputs=[b.fresh(name) if window else name])
        if window:
            b.op("Gather", [cat, index], axis=2, outputs=[name])
        present.append(b.op("Unsqueeze", [cat, b.const([2])]))  # (B, kvh, 1, K, D)
    k5, v5 = present
    q5 = b.op("Reshape", [b.op("Transpose", [q4], perm=[0, 2, 1, 3]), b.const([0, kvh, rep, -1, d])])
    scores = b.op("MatMul", [q5, b.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])], name=f"{node.name}/qk")
    scores = b.op("Mul", [scores, b.const(float(a["scale"]), "float32")])
    if a.get("softcap"):
        scores = softcap(ctx, scores, a["softcap"], f"{node.name}/softcap")
    scores = b.op("Add", [scores, _mask(ctx, a, k_pos)])
    if "sink_logits" in node.params:  # one more column per head, dropped after the softmax
        sink = ctx.weight_init(node.params["sink_logits"], "reshape", lambda t: t.reshape(1, kvh, rep, 1, 1))
        first = b.op("Slice", [scores, b.const([0]), b.const([1]), b.const([-1])])
        scores = b.op("Concat", [scores, b.op("Expand", [sink, b.op("Shape", [first])])], axis=-1)
        probs = b.op("Softmax", [scores], axis=-1)
        keys = b.op("Shape", [k5], start=3, end=4)
        probs = b.op("Slice", [probs, b.const([0]), keys, b.const([-1])], name=f"{node.name}/drop_sink")
    else:
        probs = b.op("Softmax", [scores], axis=-1)
    out = b.op("MatMul", [probs, v5], name=f"{node.name}/pv")  # (B, kvh, rep, S, D)
    out = b.op("Transpose", [b.op("Reshape", [out, b.const([0, h, -1, d])])], perm=[0, 2, 1, 3])
    return [b.op("Reshape", [out, b.const([0, 0, h * d])], name=node.name)]
