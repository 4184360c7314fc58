"""Quantized KV cache: how an ``int8``/``int4`` ``kv_cache`` dtype stores K/V, and the numbers it reads back.

A quantized cache stores each new token's K and V as integer codes with one scale (and,
when asymmetric, one zero point) per token, per KV head and per group of ``group_size``
consecutive head dimensions (``group_size == head_dim``: per-token-per-head).  Keys are
quantized *after* RoPE, as they are cached.

The stores of :mod:`tokopt.optimizer.interpret.kv_cache` keep exactly what such a cache
holds — unsigned 8-bit codes (int4: two codes packed per byte), scales in ``scale_dtype``,
8-bit zero points — through a :class:`KVCodec`, and dequantize on read, so their memory is
the format's.  Without a cache object (a whole-sequence forward) :func:`quantize_kv` applies
the same encode→decode round trip, so attention reads the same values either way.  The cost
model counts the codes through ``dtype`` and the scales/zeros through ``scale_bytes_per_token``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokopt.errors import UnsupportedOpError
from tokopt.optimizer.ir.attrs import KV_QUANT_DTYPES

_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}

#: One stored tensor per token: its width (last dim) and element type.
PlaneSpec = tuple[int, torch.dtype]


@dataclass(frozen=True)
class KVCodec:
    """How a cache stores a K or V tensor (batch, heads, seq, head_dim): as itself (a float cache).

    ``encode`` gives the *planes* the store keeps — tensors (batch, heads, seq, width) that
    the store slices, copies and concatenates along the sequence like any cached tensor —
    and ``decode`` turns planes back into what attention reads.
    """

    def planes(self, head_dim: int, dtype: torch.dtype) -> list[PlaneSpec]:
        return [(head_dim, dtype)]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def decode(self, planes: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return planes[0]


@dataclass(frozen=True)
class IntKVCodec(KVCodec):
    """Integer codes + scales (+ zero points) per token, head and ``group_size`` dims.

    Codes are stored unsigned (symmetric codes offset by ``2**(bits-1)``), int4 packed two per
    byte.  Decoding computes ``(code - offset - zero) * scale`` in float32: every operand is an
    exact small integer or the stored scale, so the values are bit-identical to quantizing and
    dequantizing in one go.
    """

    bits: int = 8
    group_size: int | None = None  # None: the whole head dimension
    symmetric: bool = True
    scale_dtype: str = "float16"

    def _groups(self, head_dim: int) -> int:
        gs = self.group_size or head_dim
        if head_dim % gs or (self.bits == 4 and head_dim % 2):
            raise UnsupportedOpError(
                f"an int{self.bits} KV cache with group size {gs} cannot store head_dim {head_dim}")
        return head_dim // gs

    def planes(self, head_dim: int, dtype: torch.dtype) -> list[PlaneSpec]:
        groups = self._groups(head_dim)
        codes = (head_dim * self.bits // 8, torch.uint8)
        scales = (groups, _SCALE_DTYPES[self.scale_dtype])
        return [codes, scales] if self.symmetric else [codes, scales, (groups, torch.uint8)]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        shape, groups = x.shape, self._groups(x.shape[-1])
        g = x.float().reshape(*shape[:-1], groups, shape[-1] // groups)
        maxq = 2 ** self.bits - 1
        if self.symmetric:
            half = 2 ** (self.bits - 1)
            scale = self._stored(g.abs().amax(-1, keepdim=True) / (half - 1))
            codes = torch.clamp(torch.round(g / scale), -half, half - 1) + half
            extra = []
        else:
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = self._stored((hi - lo) / maxq)
            zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
            codes = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
            extra = [zero.squeeze(-1).to(torch.uint8)]
        codes = codes.reshape(shape).to(torch.uint8)
        if self.bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return [codes, scale.squeeze(-1).to(_SCALE_DTYPES[self.scale_dtype]), *extra]

    def _stored(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale as the cache keeps it (rounded to ``scale_dtype``), 1 where a group is all zeros."""
        scale = scale.to(_SCALE_DTYPES[self.scale_dtype]).float()
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def decode(self, planes: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        codes, scale = planes[0], planes[1].float()
        if self.bits == 4:
            codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
        shape, groups = codes.shape, scale.shape[-1]
        q = codes.float().reshape(*shape[:-1], groups, shape[-1] // groups)
        q = q - 2 ** (self.bits - 1) if self.symmetric else q - planes[2].float().unsqueeze(-1)
        return (q * scale.unsqueeze(-1)).reshape(shape).to(dtype)


FLOAT_KV = KVCodec()


def kv_codec(kv_cache: dict[str, Any] | None) -> KVCodec:
    """The codec of an Attention's ``kv_cache``: integer codes for int8/int4, the tensors themselves otherwise.

    An integer dtype without a ``quant`` description uses symmetric per-token-per-head scales in float16.
    """
    kv_cache = kv_cache or {}
    bits = KV_QUANT_DTYPES.get(kv_cache.get("dtype", "float32"))
    if bits is None:
        return FLOAT_KV
    spec = kv_cache.get("quant") or {}
    return IntKVCodec(bits, spec.get("group_size"), spec.get("symmetric", True), spec.get("scale_dtype", "float16"))


def fake_quantize(x: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  scale_dtype: str = "float16") -> torch.Tensor:
    """Quantize→dequantize ``x`` (..., dim) with one grid per ``group_size`` slice of the last dim."""
    codec = IntKVCodec(bits, group_size, symmetric, scale_dtype)
    return codec.decode(codec.encode(x), x.dtype)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V (batch, kv_heads, seq, head_dim) as a ``kv_cache`` of that dtype would return them (no cache object).

    A float cache returns its inputs unchanged.
    """
    codec = kv_codec(kv_cache)
    if codec is FLOAT_KV:
        return k, v
    return codec.decode(codec.encode(k), k.dtype), codec.decode(codec.encode(v), v.dtype)
