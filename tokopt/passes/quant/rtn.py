"""Round-to-nearest quantization onto a grouped integer grid: the format's definition.

A weight ``(out, in)`` is cut into groups of ``group_size`` consecutive input columns;
each (row, group) gets one scale (and, when asymmetric, one zero point) and every
element becomes ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``.  Symmetric grids
use the implied zero ``2**(bits-1)`` and the whole signed range, −8…7 at 4 bits:
``scale = max(max(w) / 7, −min(w) / 8)``, so neither end clips and a group whose largest
magnitude is negative gains the 16th level (RTN int4 g32 on SmolLM2, 8 × 512 tokens:
+36.0 → +30.2 % ppl on the default text, +51.6 → +36.3 % on English prose, over the
mirrored ``absmax / 7`` grid, which GPTQ keeps: see :func:`grid_params`).  The quantize
pass keeps the mirrored grid for weights whose Linears quantize their inputs at run time
(``act_bits``, onnxruntime's int8 kernel): single MatMulNBits nodes compute code −8 exactly
(``tests/test_activation_quant.py``), yet whole tiny models lowered with it disagreed with
the reference (top-1 0.95 where the mirrored grid agrees to 1.0), so that combination is not
the format until the cause is found.  Scales are rounded to their storage dtype *before*
the codes are computed, so dequantizing the stored values reproduces exactly what the
quantizer measured its error against.
"""

from __future__ import annotations

import torch

from tokopt.optimizer.ir.weights import QuantizedWeight, pack_codes

SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32,
                                        "bfloat16": torch.bfloat16}
RTN_SLAB = 1 << 22  # elements quantized at a time


def grid_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float16,
                shrink: torch.Tensor | float = 1.0, mirrored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both float, rounded as stored) for groups on the last dim of ``w``.

    ``w`` is ``(..., group_size)``; the results have shape ``w.shape[:-1]``.  ``shrink``
    (≤ 1, broadcastable to that shape) clips the range before the grid is fitted: the
    calibrated methods search it, plain RTN uses 1.  ``mirrored`` fits a symmetric grid to
    ``±absmax`` (``absmax / 7`` at 4 bits) instead of the whole signed range: GPTQ's error
    feedback moves weights past their group's original extremes, on either side, and needs the
    room (on SmolLM2 GPTQ g32 the whole-range fit lost 1.4–1.7 points of ppl to it).
    """
    w = w.float()
    maxq = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        if mirrored:
            scale = w.abs().amax(-1) / (half - 1) * shrink
        else:
            scale = torch.maximum(w.amax(-1) / (half - 1), -w.amin(-1) / half) * shrink
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = scale.to(scale_dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # fp16 underflow
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
        return scale, zero
    wmin = torch.clamp(w.amin(-1), max=0) * shrink
    wmax = torch.clamp(w.amax(-1), min=0) * shrink
    scale = (wmax - wmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for ``w`` given per-element-broadcastable ``scale`` and ``zero`` (float)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2 ** bits - 1)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: str = "float16",
                  shrink: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``w`` ``(out, in)`` quantized and dequantized in one go: the values the stored format reads back.

    Cheap (no packing), for estimates that try many formats; equal to ``quantize_rtn(...).dequantize()``.
    """
    out_f, in_f = w.shape
    gs = resolve_group_size(group_size, in_f)
    grouped = w.float().reshape(out_f, in_f // gs, gs)
    scale, zero = grid_params(grouped, bits, symmetric, SCALE_DTYPES[scale_dtype], shrink)
    codes = quantize_codes(grouped, scale[..., None], zero[..., None], bits)
    return ((codes - zero[..., None]) * scale[..., None]).reshape(out_f, in_f)


def resolve_group_size(group_size: int, in_features: int) -> int:
    """``-1``/``0`` mean per-channel: one group spanning the whole input dimension."""
    return in_features if group_size <= 0 else group_size


def quantized_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                     symmetric: bool, scale_dtype: torch.dtype, method: str, extra: dict | None = None,
                     ) -> QuantizedWeight:
    """Package ``(out, in)`` codes and ``(out, n_groups)`` grid parameters as the IR value type."""
    out_f, in_f = codes.shape
    return QuantizedWeight(
        packed=pack_codes(codes.to(torch.uint8), bits),
        scales=scale.to(scale_dtype).contiguous(),
        zero_points=None if symmetric else zero.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
        shape=(out_f, in_f),
        method=method,
        extra=dict(extra or {}),
    )


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = True,
                 scale_dtype: str = "float16", shrink: torch.Tensor | float = 1.0,
                 method: str = "rtn", mirrored: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight ``(out, in)``.

    ``group_size`` must divide ``in`` (the pass checks this with an actionable message
    before calling); ``-1`` or ``0`` is per-channel; ``mirrored`` as :func:`grid_params`.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_rtn expects a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    gs = resolve_group_size(group_size, in_f)
    if in_f % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {in_f}")
    sdtype = SCALE_DTYPES[scale_dtype]
    # a slab of rows at a time (rows are independent): a 7B model's embedding would otherwise need
    # several float32 copies of itself at once; a per-row shrink tensor is applied whole
    step = out_f if isinstance(shrink, torch.Tensor) else max(1, RTN_SLAB // in_f)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    scales, zeros = [], []
    for r in range(0, out_f, step):
        grouped = w[r:r + step].float().reshape(-1, in_f // gs, gs)
        scale, zero = grid_params(grouped, bits, symmetric, sdtype, shrink, mirrored)
        codes[r:r + step] = quantize_codes(grouped, scale[..., None], zero[..., None], bits).reshape(-1, in_f)
        scales.append(scale)
        zeros.append(zero)
    return quantized_weight(codes, torch.cat(scales), torch.cat(zeros), bits, gs, symmetric, sdtype, method,
                            {"scale_dtype": scale_dtype})
