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

``kv_cache.quant.key_axis == "channel"`` is KIVI (:class:`KiviKVCodec`): keys get one grid per
channel over each block of ``token_group`` positions, values stay per token, and a query at ``t``
reads positions from ``kivi_quantized_below(t, G, R)`` on in full precision.  Since that mix
depends on the query, a whole-sequence forward (:func:`kv_view`) hands attention both copies of
every position and the mask picks one per query — the same slots and the same rule a cache's view
gives, so cached decode equals recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokopt.errors import UnsupportedOpError
from tokopt.optimizer.ir.attrs import KV_QUANT_DTYPES, kivi_key_param_width

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

    # K and V together: the store keeps K's planes, then V's (a KIVI cache stores K and V differently)
    def kv_planes(self, head_dim: int, dtype: torch.dtype) -> list[PlaneSpec]:
        return self.planes(head_dim, dtype) * 2

    def encode_kv(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        return [*self.encode(k), *self.encode(v)]

    def decode_kv(self, planes: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        half = len(planes) // 2
        return self.decode(planes[:half], dtype), self.decode(planes[half:], dtype)


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


@dataclass(frozen=True)
class KiviKVCodec(KVCodec):
    """KIVI (Liu et al. 2024): keys quantized per channel over blocks of ``token_group`` positions, values per token.

    V is stored as :class:`IntKVCodec` stores it (``bits``, ``group_size``, ``symmetric``).  K's codes
    are one ``bits``-bit code per element, like V's; its grid is per (head, channel, block of ``G``
    positions ``[j*G, (j+1)*G)``): an asymmetric min/max grid, ``scale = (max - min) / (2**bits - 1)``
    and ``min`` both rounded to ``scale_dtype``, ``code = clamp(round((x - min) / scale), 0, 2**bits - 1)``,
    read back as ``code * scale + min``.  A block's ``2 * head_dim`` scale/min values are stored spread
    over its ``G`` token rows (``ceil(2 * head_dim * scale bytes / G)`` bytes each), so every stored
    plane stays one row per token, and the stores slice, page and copy it like any other.

    A block can only be encoded once its ``G`` tokens exist: a store appends placeholder K rows,
    keeps the newest tokens in full precision (``residual + token_group`` ring slots) and
    rewrites a block's K rows with :meth:`encode_keys` once the read rule
    (:func:`~tokopt.optimizer.ir.attrs.kivi_quantized_below`) first reads it quantized.
    """

    bits: int = 4
    group_size: int | None = None  # V: head dims per scale (None: the whole head)
    symmetric: bool = False  # V's grid (K's is always asymmetric)
    scale_dtype: str = "float16"
    token_group: int = 64
    residual: int = 0

    @property
    def values(self) -> IntKVCodec:
        return IntKVCodec(self.bits, self.group_size, self.symmetric, self.scale_dtype)

    @property
    def ring_slots(self) -> int:
        return self.token_group + self.residual

    def _width(self, head_dim: int) -> int:
        return kivi_key_param_width(head_dim, self.token_group, self.scale_dtype)

    def key_planes(self, head_dim: int) -> list[PlaneSpec]:
        if head_dim * self.bits % 8:
            raise UnsupportedOpError(f"an int{self.bits} KV cache cannot store head_dim {head_dim}")
        return [(head_dim * self.bits // 8, torch.uint8), (self._width(head_dim), torch.uint8)]

    def kv_planes(self, head_dim: int, dtype: torch.dtype) -> list[PlaneSpec]:
        return [*self.key_planes(head_dim), *self.values.planes(head_dim, dtype)]

    def encode_kv(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """Placeholder K rows (rewritten once their block is complete) and V's encoded rows."""
        placeholder = [k.new_zeros((*k.shape[:-1], width), dtype=dt) for width, dt in self.key_planes(k.shape[-1])]
        return [*placeholder, *self.values.encode(v)]

    def decode_kv(self, planes: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode_keys(planes[0], planes[1], dtype), self.values.decode(planes[2:], dtype)

    def encode_keys(self, k: torch.Tensor) -> list[torch.Tensor]:
        """K rows (batch, heads, n, d) of whole blocks (``n`` a multiple of ``token_group``) -> [codes, params]."""
        b, h, n, d = k.shape
        g, maxq, sd = self.token_group, 2 ** self.bits - 1, _SCALE_DTYPES[self.scale_dtype]
        x = k.float().reshape(b, h, n // g, g, d)
        lo, hi = x.amin(3, keepdim=True), x.amax(3, keepdim=True)
        scale = (hi - lo) / maxq
        scale = scale.to(sd).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        low = lo.to(sd).float()
        codes = torch.clamp(torch.round((x - low) / scale), 0, maxq).reshape(b, h, n, d).to(torch.uint8)
        if self.bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        width, raw = self._width(d), 2 * d * sd.itemsize
        blob = torch.cat([scale.to(sd), low.to(sd)], dim=-1).view(torch.uint8).reshape(b, h, n // g, raw)
        blob = torch.nn.functional.pad(blob, (0, g * width - blob.shape[-1]))
        return [codes, blob.reshape(b, h, n, width)]

    def decode_keys(self, codes: torch.Tensor, params: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """K read back from [codes, params] rows that start at a block boundary; rows past the last whole
        block (a block not complete yet: the read rule never reads it quantized) read as zeros."""
        if self.bits == 4:
            codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
        b, h, n, d = codes.shape
        g, sd = self.token_group, _SCALE_DTYPES[self.scale_dtype]
        full = n // g * g
        blob = params[:, :, :full].reshape(b, h, n // g, g * params.shape[-1])[..., :2 * d * sd.itemsize]
        grid = blob.contiguous().view(sd).float().reshape(b, h, n // g, 1, 2 * d)
        q = codes[:, :, :full].float().reshape(b, h, n // g, g, d)
        x = (q * grid[..., :d] + grid[..., d:]).reshape(b, h, full, d)
        if full < n:
            x = torch.cat([x, x.new_zeros(b, h, n - full, d)], dim=2)
        return x.to(dtype)


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
    if spec.get("key_axis") == "channel":
        return KiviKVCodec(bits, spec.get("group_size"), spec.get("symmetric", False),
                           spec.get("scale_dtype", "float16"), int(spec["token_group"]), int(spec.get("residual", 0)))
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
    if isinstance(codec, KiviKVCodec):
        raise UnsupportedOpError("a KIVI (key_axis='channel') cache reads a per-query mix of quantized and "
                                 "full-precision K/V: use kv_view")
    return codec.decode(codec.encode(k), k.dtype), codec.decode(codec.encode(v), v.dtype)


def kv_view(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_cache: dict[str, Any]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What attention reads from a ``kv_cache`` of this dtype, without a cache object (a whole-sequence forward).

    Returns K, V (batch, kv_heads, slots, head_dim), the slots' positions and, for a KIVI cache, which
    slots hold the dequantized copy of their position (the others the full-precision one): every position
    appears twice and the attention mask (:func:`~tokopt.optimizer.interpret.kernels.attention_mask`) picks,
    per query, the copy the read rule says a cache would hand it.  ``None``: one copy of each position.
    """
    codec = kv_codec(kv_cache)
    if not isinstance(codec, KiviKVCodec):
        k, v = quantize_kv(k, v, kv_cache)
        return k, v, positions, None
    n = positions.numel()
    if n and not torch.equal(positions, torch.arange(n, device=positions.device)):
        raise UnsupportedOpError("a whole-sequence forward over a KIVI KV cache must start at position 0")
    full = n // codec.token_group * codec.token_group
    kq = codec.decode_keys(*codec.encode_keys(k[:, :, :full]), k.dtype)
    kq = torch.cat([kq, torch.zeros_like(k[:, :, full:])], dim=2)
    vq = codec.values.decode(codec.values.encode(v), v.dtype)
    quantized = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    return torch.cat([kq, k], dim=2), torch.cat([vq, v], dim=2), torch.cat([positions, positions]), quantized
