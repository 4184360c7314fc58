"""One typed schema per attribute family of the IR: what a valid value is, checked in one place.

The verifier (:mod:`tokopt.optimizer.ir.verify`) calls these after the frontend and every
pass; passes build attribute values with the constructors here; the interpreter and the
backends read the same definitions.  A value that is stored but that nothing honours is
invalid here, so it can never be silently ignored downstream.
"""

from __future__ import annotations

from typing import Any

# -- act_quant: run-time quantization of a Linear's input ---------------------------------------------
ACT_BITS = (8,)


def act_quant_attr(bits: int, block: int) -> dict[str, int]:
    """The attribute value a pass stores on a Linear."""
    return {"bits": int(bits), "block": int(block)}


def check_act_quant(spec: Any, in_features: int) -> str | None:
    """Why ``spec`` is not a valid ``act_quant`` for a Linear of ``in_features`` inputs (None: valid)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"bits", "block"}:
        return f"act_quant must be {{'bits': 8, 'block': B}}, got {spec!r}"
    if spec["bits"] not in ACT_BITS:
        return f"act_quant bits {spec['bits']} (supported: {', '.join(map(str, ACT_BITS))})"
    if spec["block"] < 1 or in_features % spec["block"]:
        return f"act_quant block {spec['block']} does not divide in_features {in_features}"
    return None


# -- act_dtype: the precision a Linear's input and output are rounded to -----------------------------
#: ``bfloat16``: the input is rounded to bfloat16, multiplied by the exact (dequantized) weight with
#: float32 accumulation, and the product rounded to bfloat16 before the bias is added — what torch's
#: low-bit CPU kernels (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) compute.
ACT_DTYPES = ("bfloat16",)


def check_act_dtype(value: Any, act_quant: Any) -> str | None:
    """Why ``value`` is not a valid ``act_dtype`` for a Linear (None: valid)."""
    if value is None:
        return None
    if value not in ACT_DTYPES:
        return f"act_dtype {value!r} (supported: {', '.join(ACT_DTYPES)}, or none for float32)"
    if act_quant is not None:
        return "act_dtype and act_quant are exclusive (an input is either rounded to bfloat16 or quantized to int8)"
    return None


# -- kv_cache: dtype, quantization, layout and storage of an Attention's cache ------------------------
KV_QUANT_DTYPES = {"int8": 8, "int4": 4}
KV_DTYPES = ("float32", "float16", "bfloat16", *KV_QUANT_DTYPES)
KV_LAYOUTS = ("BNSH", "BSNH")
KV_STORAGES = ("dynamic", "static", "paged")
_SCALE_BYTES = {"float16": 2, "float32": 4}


KV_KEY_AXES = ("token", "channel")


def kv_cache_quant_attrs(bits: int, num_kv_heads: int, head_dim: int, group_size: int | None = None,
                         symmetric: bool = True, scale_dtype: str = "float16", key_axis: str = "token",
                         token_group: int | None = None, residual: int = 0) -> dict[str, Any]:
    """The ``kv_cache`` entries describing a quantized cache (merge into the Attention attrs).

    ``key_axis="token"``: K and V alike get one scale (and, asymmetric, one uint8 zero point) per
    token, per head and per ``group_size`` dims.  ``key_axis="channel"`` (KIVI): V as before, but
    each head dimension of K gets its own ``scale_dtype`` scale and minimum (asymmetric min/max grid)
    over each block of ``token_group`` consecutive positions (block ``j`` = positions
    ``[j*G, (j+1)*G)``); a query at position ``t`` reads the positions below
    :func:`kivi_quantized_below` dequantized and every newer one in full precision, from a
    ring of ``residual + token_group`` full-precision slots per sequence (:func:`kv_residual_slots`).
    ``scale_bytes_per_token`` is what is stored per cached token: a K block's
    ``2 * head_dim`` scale/min values are spread over its ``G`` tokens as
    ``ceil(2 * head_dim * scale bytes / G)`` bytes each.
    """
    gs = group_size or head_dim
    if head_dim % gs:
        raise ValueError(f"kv group size {gs} does not divide head_dim {head_dim}")
    if key_axis not in KV_KEY_AXES:
        raise ValueError(f"kv key_axis {key_axis!r} (valid: {', '.join(KV_KEY_AXES)})")
    sb = _SCALE_BYTES[scale_dtype]
    per_group = sb + (0 if symmetric else 1)
    value_bytes = num_kv_heads * (head_dim // gs) * per_group
    dims = "" if gs == head_dim else f", per {gs} dims"
    quant: dict[str, Any] = {"bits": bits, "group_size": gs, "symmetric": symmetric, "scale_dtype": scale_dtype}
    if key_axis == "channel":
        if not token_group or token_group < 1 or residual < 0:
            raise ValueError(f"kv token_group {token_group!r} / residual {residual!r}: need G >= 1 and R >= 0")
        key_bytes = num_kv_heads * kivi_key_param_width(head_dim, token_group, scale_dtype)
        quant.update(key_axis="channel", token_group=int(token_group), residual=int(residual),
                     granularity=f"keys per channel over {token_group}-token groups (asym), values per token, "
                                 f"per head{dims}; the newest {residual}..{residual + token_group - 1} tokens "
                                 "in full precision")
        return {"dtype": f"int{bits}", "scale_bytes_per_token": key_bytes + value_bytes, "quant": quant}
    quant["granularity"] = "per-token, per-head" + dims
    return {"dtype": f"int{bits}", "scale_bytes_per_token": 2 * value_bytes, "quant": quant}


def kivi_key_param_width(head_dim: int, token_group: int, scale_dtype: str = "float16") -> int:
    """Bytes per token (per head) holding a KIVI key block's per-channel scale and minimum."""
    return -(-2 * head_dim * _SCALE_BYTES[scale_dtype] // token_group)


def kivi_quantized_below(t: int, token_group: int, residual: int) -> int:
    """The KIVI read rule: a query at position ``t`` reads cached positions ``s < G*floor(max(t+1-R, 0)/G)``
    dequantized (whole completed blocks that are also older than the ``R`` newest tokens) and every
    position from there to ``t`` in full precision — between ``R`` and ``R + G - 1`` tokens once
    ``t >= R``.  Works on ints and on integer tensors alike."""
    span = t + 1 - residual
    span = span.clamp(min=0) if hasattr(span, "clamp") else max(span, 0)
    return span // token_group * token_group


def kv_residual_slots(kv_cache: dict[str, Any] | None) -> int:
    """Full-precision slots one sequence's cache keeps beside the quantized ones (KIVI: ``R + G``; else 0).

    ``R + G - 1`` tokens are the most a query reads in full precision; the ring has one slot more so that
    a decode step writes its token before the block that leaves the ring is quantized."""
    q = (kv_cache or {}).get("quant") or {}
    if q.get("key_axis") != "channel":
        return 0
    return int(q["token_group"]) + int(q["residual"])


def check_kv_cache(attrs: dict[str, Any]) -> list[str]:
    """Why an Attention's ``kv_cache`` (read with its window and sinks) is invalid; empty when valid."""
    kv = attrs.get("kv_cache")
    if not isinstance(kv, dict):
        return [f"kv_cache must be a mapping, got {kv!r}"]
    problems = []
    dtype = kv.get("dtype")
    if dtype not in KV_DTYPES:
        problems.append(f"kv_cache.dtype {dtype!r} (valid: {', '.join(KV_DTYPES)})")
    if dtype in KV_QUANT_DTYPES:
        q = kv.get("quant") or {}
        if q.get("bits") != KV_QUANT_DTYPES[dtype] or not q.get("group_size") or \
                attrs["head_dim"] % q["group_size"] or q.get("scale_dtype") not in _SCALE_BYTES:
            problems.append(f"kv_cache.quant {q!r} does not describe a {dtype} cache of head_dim {attrs['head_dim']}")
        else:
            problems += _check_key_axis(attrs, q)
    elif (kv.get("quant") or {}).get("key_axis", "token") != "token":
        problems.append(f"kv_cache.quant.key_axis={kv['quant']['key_axis']!r} on a {dtype} cache (needs int8/int4)")
    return problems + check_kv_storage(attrs)


def _check_key_axis(attrs: dict[str, Any], q: dict[str, Any]) -> list[str]:
    """Why the key-axis part of a quantized ``kv_cache.quant`` is invalid (KIVI's token group and residual)."""
    axis = q.get("key_axis", "token")
    if axis not in KV_KEY_AXES:
        return [f"kv_cache.quant.key_axis {axis!r} (valid: {', '.join(KV_KEY_AXES)})"]
    if axis == "token":
        extra = sorted({"token_group", "residual"} & set(q))
        return [f"kv_cache.quant has {', '.join(extra)} but key_axis='token' (they belong to key_axis='channel')"] \
            if extra else []
    problems = []
    tg, res = q.get("token_group"), q.get("residual")
    if not isinstance(tg, int) or isinstance(tg, bool) or tg < 1:
        problems.append(f"kv_cache.quant.token_group {tg!r} must be an integer >= 1 (tokens per key scale)")
    if not isinstance(res, int) or isinstance(res, bool) or res < 0:
        problems.append(f"kv_cache.quant.residual {res!r} must be an integer >= 0 (full-precision recent tokens)")
    if attrs.get("window"):
        problems.append(f"kv_cache.quant.key_axis='channel' (KIVI) with window={attrs['window']}: a sliding-window "
                        "ring evicts tokens out of the per-channel key groups; use key_axis='token' on windowed "
                        "layers")
    if not problems:
        kvh = attrs.get("num_kv_heads") or 0
        gs = q["group_size"]
        expected = kv_cache_quant_attrs(KV_QUANT_DTYPES[attrs["kv_cache"]["dtype"]], kvh, attrs["head_dim"], gs,
                                        q.get("symmetric", True), q["scale_dtype"], "channel", tg, res)
        stored = attrs["kv_cache"].get("scale_bytes_per_token")
        if stored != expected["scale_bytes_per_token"]:
            problems.append(f"kv_cache.scale_bytes_per_token={stored!r} but a KIVI cache of this shape stores "
                            f"{expected['scale_bytes_per_token']} (keys' per-channel scale+min, values' scales)")
    return problems


def check_kv_storage(attrs: dict[str, Any]) -> list[str]:
    """Why the layout/storage part of an Attention's ``kv_cache`` is invalid; empty when valid."""
    kv = attrs.get("kv_cache") or {}
    problems = []
    layout, storage = kv.get("layout") or "BNSH", kv.get("storage") or "dynamic"
    if layout not in KV_LAYOUTS:
        problems.append(f"kv_cache.layout {layout!r} (valid: {', '.join(KV_LAYOUTS)})")
    if storage not in KV_STORAGES:
        problems.append(f"kv_cache.storage {storage!r} (valid: {', '.join(KV_STORAGES)})")
    block, max_len = kv.get("block_size"), kv.get("max_len")
    if storage == "paged" and not (isinstance(block, int) and block > 0):
        problems.append("a paged KV cache needs kv_cache.block_size >= 1 (kv-layout:block_size=…)")
    window, sinks = attrs.get("window"), int(attrs.get("sinks") or 0)
    if storage == "static" and not (max_len or window):
        problems.append("a static KV cache needs kv_cache.max_len (kv-layout:max_len=…) or a sliding window")
    if window and max_len and max_len < sinks + window:
        problems.append(f"kv_cache.max_len={max_len} cannot hold the {sinks} sinks + {window}-token window; "
                        "leave max_len unset on windowed layers (the ring needs exactly sinks + window slots)")
    return problems


# -- window / sinks: the attention span ------------------------------------------------------------------
def check_span(attrs: dict[str, Any]) -> list[str]:
    """Why an Attention's ``window``/``sinks`` are invalid; empty when valid."""
    problems = []
    window, sinks = attrs.get("window"), attrs.get("sinks", 0)
    if window is not None and (not isinstance(window, int) or window < 1):
        problems.append("window must be an integer >= 1")
    if sinks and not window:
        problems.append("sinks without a window have no effect")
    if sinks is not None and (not isinstance(sinks, int) or sinks < 0):
        problems.append("sinks must be an integer >= 0")
    return problems


# -- rope: rotary position embedding -------------------------------------------------------------------
ROPE_KEYS = {"theta", "type", "rotary_dim", "interleaved", "inv_freq", "attention_factor"}
#: LongRoPE (Phi-3): a second frequency set used for a whole step once it reaches past the pretraining length.
LONG_ROPE_KEYS = {"long_inv_freq", "original_max_positions"}


def uses_long_rope(rope: dict[str, Any] | None) -> bool:
    """Whether ``rope`` switches to ``long_inv_freq`` for steps reaching past ``original_max_positions``.

    The rule is transformers' for LongRoPE: a forward whose largest position ``p`` has ``p + 1 >
    original_max_positions`` rotates every query and key it computes with the long frequencies; keys
    cached by earlier steps keep the rotation they were cached with."""
    return bool(rope and rope.get("long_inv_freq"))


def check_rope(rope: dict[str, Any] | None, head_dim: int) -> list[str]:
    """Why an Attention's ``rope`` is invalid; empty when valid (``None``: no RoPE)."""
    if rope is None:
        return []
    problems = []
    unknown = sorted(set(rope) - ROPE_KEYS - LONG_ROPE_KEYS)
    if unknown:
        problems.append(f"rope has unknown key(s) {', '.join(unknown)}")
    rd = rope.get("rotary_dim")
    if not isinstance(rd, int) or rd < 2 or rd % 2 or rd > head_dim:
        problems.append(f"rope rotary_dim {rd!r} must be even and within 2..head_dim={head_dim}")
    elif len(rope.get("inv_freq") or []) * 2 != rd:
        problems.append(f"rope inv_freq has {len(rope.get('inv_freq') or [])} entries for rotary_dim {rd}")
    if set(rope) & LONG_ROPE_KEYS:
        long, orig = rope.get("long_inv_freq") or [], rope.get("original_max_positions")
        if len(long) != len(rope.get("inv_freq") or []):
            problems.append(f"rope long_inv_freq has {len(long)} entries, inv_freq {len(rope.get('inv_freq') or [])}")
        if not isinstance(orig, int) or isinstance(orig, bool) or orig < 1:
            problems.append(f"rope original_max_positions {orig!r} must be an integer >= 1 (LongRoPE's switch point)")
    if rope.get("interleaved"):
        problems.append("rope.interleaved (GPT-J style pairs) is not part of the IR's RoPE; the frontend must "
                        "permute q/k projections into the half-rotation layout")
    return problems


# -- MoE: routing and the experts' gated unit -----------------------------------------------------------
MOE_ROUTINGS = ("softmax_topk", "topk_softmax")
GLU_KINDS = ("clamped_swiglu",)


def check_moe(attrs: dict[str, Any]) -> list[str]:
    """Why an MoE's ``routing``/``glu`` attributes are invalid; empty when valid."""
    problems = []
    if attrs.get("routing", "softmax_topk") not in MOE_ROUTINGS:
        problems.append(f"routing {attrs.get('routing')!r} (valid: {', '.join(MOE_ROUTINGS)})")
    glu = attrs.get("glu")
    if glu is not None:
        if not isinstance(glu, dict) or glu.get("kind") not in GLU_KINDS or set(glu) != {"kind", "alpha", "limit"}:
            problems.append(f"glu {glu!r} must be {{'kind': 'clamped_swiglu', 'alpha': a, 'limit': l}}")
        elif not glu["limit"] > 0:
            problems.append(f"glu limit {glu['limit']!r} must be > 0")
    return problems
