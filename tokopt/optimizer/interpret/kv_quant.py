"""Quantized KV cache: the reference numerics of an ``int8``/``int4`` ``kv_cache`` dtype.

A quantized cache stores each new token's K and V as integer codes with one scale (and,
when asymmetric, one zero point) per token, per KV head and per group of ``group_size``
consecutive head dimensions (``group_size == head_dim``: per-token-per-head).  Keys are
quantized *after* RoPE, as they are cached.  The reference executor applies the
quantize→dequantize round trip when K/V are produced — in prefill and decode alike, with
or without a cache object — so attention always reads exactly the values a real
quantized cache would hold.  The cost model counts the codes through ``dtype`` and the
scales/zeros through ``scale_bytes_per_token``, both computed here.
"""

from __future__ import annotations

from typing import Any

import torch

from tokopt.optimizer.ir.attrs import KV_QUANT_DTYPES


def fake_quantize(x: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  scale_dtype: str = "float16") -> torch.Tensor:
    """Quantize→dequantize ``x`` (..., dim) with one grid per ``group_size`` slice of the last dim."""
    shape = x.shape
    g = x.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    sdtype = torch.float16 if scale_dtype == "float16" else torch.float32
    maxq = 2 ** bits - 1
    if symmetric:
        scale = g.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        scale = scale.to(sdtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(g / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        out = q * scale
    else:
        lo = g.amin(-1, keepdim=True)
        hi = g.amax(-1, keepdim=True)
        scale = ((hi - lo) / maxq).to(sdtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
        q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
        out = (q - zero) * scale
    return out.reshape(shape).to(x.dtype)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V (batch, kv_heads, seq, head_dim) as a ``kv_cache`` of that dtype would return them.

    A float cache returns its inputs unchanged; an integer dtype without a ``quant``
    description uses symmetric per-token-per-head scales in float16.
    """
    bits = KV_QUANT_DTYPES.get(kv_cache.get("dtype", "float32"))
    if bits is None:
        return k, v
    spec = kv_cache.get("quant") or {}
    gs = spec.get("group_size") or k.shape[-1]
    sym = spec.get("symmetric", True)
    sdt = spec.get("scale_dtype", "float16")
    return fake_quantize(k, bits, gs, sym, sdt), fake_quantize(v, bits, gs, sym, sdt)
