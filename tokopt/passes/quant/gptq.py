"""GPTQ: choose the integer codes that keep a layer's *outputs* close, not its weights.

Frantar et al. (2022) quantize one input column at a time and push each column's
rounding error onto the not-yet-quantized columns through the inverse Hessian
``H = X^T X`` of the layer's calibration inputs, so errors cancel in ``X @ W^T``.
Two choices make it fit tokopt's storage format:

- *static groups*: each group's grid (scale/zero) is fitted once, before the column
  sweep, so groups stay contiguous in the original column order even when columns are
  visited in activation order (AutoGPTQ's ``static_groups``); no ``g_idx`` is needed and
  every backend that reads ``QuantizedWeight`` can run the result unchanged;
- *clip search*: each grid is fitted by trying a few range shrinks and keeping the one
  with the smallest input-energy-weighted error ``sum_i H_ii (w_i - q_i)^2``, which
  matters most at 4 bits where the absmax grid wastes levels on a single outlier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tokopt.optimizer.ir.weights import QuantizedWeight
from tokopt.passes.quant.rtn import SCALE_DTYPES, grid_params, quantize_codes, quantized_weight, resolve_group_size

CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0 … 0.70


def search_grid(w: torch.Tensor, importance: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                scale_dtype: torch.dtype, shrinks: tuple[float, ...] = CLIP_GRID,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero minimising ``importance``-weighted squared rounding error.

    ``w`` is ``(out, in)``, ``importance`` ``(in,)`` (the Hessian diagonal: mean squared
    input of each column).  Returns ``(out, n_groups)`` scale and zero tensors.
    """
    out_f, in_f = w.shape
    grouped = w.float().reshape(out_f, in_f // group_size, group_size)
    weight = importance.float().reshape(1, in_f // group_size, group_size)
    best_err = best_scale = best_zero = None
    for shrink in shrinks:
        scale, zero = grid_params(grouped, bits, symmetric, scale_dtype, shrink)
        q = quantize_codes(grouped, scale[..., None], zero[..., None], bits)
        err = (((q - zero[..., None]) * scale[..., None] - grouped) ** 2 * weight).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread for the duration.

    The column sweep is thousands of small ops; on a busy machine their thread
    synchronisation dominates (measured 14x slower with 2 threads on 2 loaded cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = True,
                  scale_dtype: str = "float16", damp: float = 0.01, act_order: bool = True, block_size: int = 128,
                  clip_search: bool = True) -> QuantizedWeight:
    """Quantize ``w`` ``(out, in)`` given ``hessian`` ``(in, in)`` = mean of ``x x^T`` over calibration tokens.

    ``damp`` adds ``damp * mean(diag(H))`` to the diagonal (numerical stability and a
    pull towards plain rounding); ``act_order`` visits columns by decreasing input energy.
    """
    with single_thread():
        return _gptq(w, hessian, bits, group_size, symmetric, scale_dtype, damp, act_order, block_size, clip_search)


def _gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: str,
          damp: float, act_order: bool, block_size: int, clip_search: bool) -> QuantizedWeight:
    out_f, in_f = w.shape
    gs = resolve_group_size(group_size, in_f)
    if in_f % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {in_f}")
    sdtype = SCALE_DTYPES[scale_dtype]
    W = w.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    importance = torch.diag(H).to(torch.float32)
    if clip_search:
        scale, zero = search_grid(W, importance, bits, gs, symmetric, sdtype)
    else:
        scale, zero = grid_params(W.reshape(out_f, in_f // gs, gs), bits, symmetric, sdtype)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)

    group_of = perm // gs  # group of each permuted column
    codes = torch.zeros_like(W)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w_blk = W[:, i1:i2].clone()
        err_blk = torch.zeros_like(w_blk)
        h_blk = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w_blk[:, i]
            g = group_of[i1 + i]
            s, z = scale[:, g], zero[:, g]
            q = quantize_codes(col, s, z, bits)
            codes[:, i1 + i] = q
            err = (col - (q - z) * s) / h_blk[i, i]
            w_blk[:, i:] -= err[:, None] * h_blk[i, i:][None, :]
            err_blk[:, i] = err
        W[:, i2:] -= err_blk @ hinv[i1:i2, i2:]

    codes = codes[:, torch.argsort(perm)]
    return quantized_weight(codes, scale, zero, bits, gs, symmetric, sdtype, "gptq",
                            {"scale_dtype": scale_dtype, "damp": damp, "act_order": act_order,
                             "clip_search": clip_search})


def output_error(w: torch.Tensor, q: QuantizedWeight, hessian: torch.Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)``: the expected squared output error the methods minimise."""
    d = (w.float() - q.dequantize()).double()
    return float(torch.einsum("oi,ij,oj->", d, hessian.double(), d))
