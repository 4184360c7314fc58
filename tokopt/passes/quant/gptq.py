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
  matters most at 4 bits where the absmax grid wastes levels on a single outlier;
- *mirrored symmetric grids* (``±absmax``, not RTN's whole signed range): the sweep pushes
  weights past their group's extremes on either side and needs room for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tokopt.optimizer.ir.weights import QuantizedWeight
from tokopt.passes.quant.rtn import SCALE_DTYPES, grid_params, quantize_codes, quantized_weight, resolve_group_size

CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0 … 0.70
SEARCH_ROWS = 1 << 18  # elements per row chunk of the clip search: its temporaries stay in cache


def search_grid(w: torch.Tensor, importance: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                scale_dtype: torch.dtype, shrinks: tuple[float, ...] = CLIP_GRID, mirrored: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero minimising ``importance``-weighted squared rounding error.

    ``w`` is ``(out, in)``, ``importance`` ``(in,)`` (the Hessian diagonal: mean squared
    input of each column); ``mirrored`` as :func:`~tokopt.passes.quant.rtn.grid_params` takes
    it.  Returns ``(out, n_groups)`` scale and zero tensors.  Rows are
    searched a chunk at a time: every shrink re-reads the chunk, and a chunk that fits in
    cache makes the 13 passes cost little more than one (a 4096 x 11008 weight: 13.5 s
    whole, a few seconds chunked).
    """
    out_f, in_f = w.shape
    rows = max(1, SEARCH_ROWS // in_f)
    weight = importance.float().reshape(1, in_f // group_size, group_size)
    scales, zeros = [], []
    for r in range(0, out_f, rows):
        grouped = w[r:r + rows].float().reshape(-1, in_f // group_size, group_size)
        best_err = best_scale = best_zero = None
        for shrink in shrinks:
            scale, zero = grid_params(grouped, bits, symmetric, scale_dtype, shrink, mirrored)
            q = quantize_codes(grouped, scale[..., None], zero[..., None], bits)
            err = (((q - zero[..., None]) * scale[..., None] - grouped) ** 2 * weight).sum(-1)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
        scales.append(best_scale)
        zeros.append(best_zero)
    return torch.cat(scales), torch.cat(zeros)


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


@dataclass(frozen=True)
class InverseHessian:
    """What GPTQ needs from one layer input's statistics, computed once for all its readers.

    q/k/v (and gate/up) read the same input, so they share the column order and the
    factor: on a 7B layer the factorizations are most of GPTQ's arithmetic when redone
    for each weight.
    """

    importance: torch.Tensor  # (in,) Hessian diagonal, original column order: the clip search's weights
    dead: torch.Tensor  # (in,) bool: columns no calibration token ever set (their weights cannot matter)
    perm: torch.Tensor  # (in,) the order columns are quantized in
    hinv: torch.Tensor  # (in, in) upper Cholesky factor of the damped inverse Hessian, in ``perm`` order


def inverse_hessian(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> InverseHessian:
    """Factor ``hessian`` (mean ``x x^T``) the way the column sweep reads it.

    ``damp`` adds ``damp * mean(diag(H))`` to the diagonal (numerical stability and a
    pull towards plain rounding); ``act_order`` visits columns by decreasing input energy.
    The factorization runs in float32 on every thread, as the reference implementation
    does on a GPU: with the damping the matrix is well conditioned, and float64 on one
    thread took 33 s for an 11,008-wide input.
    """
    in_f = hessian.shape[0]
    importance = torch.diagonal(hessian).detach().to(torch.float32).clone()
    dead = importance == 0
    importance[dead] = 1.0
    perm = torch.argsort(importance, descending=True) if act_order else torch.arange(in_f)
    H = hessian.detach().to(torch.float32).index_select(0, perm).index_select(1, perm)
    diag = torch.diagonal(H)
    diag.copy_(importance[perm])
    diag.add_(damp * float(diag.double().mean()))
    # in place: an 11,008-wide factor is 485 MB, and three of them at once would be most of a layer's memory
    torch.linalg.cholesky(H, out=H)
    torch.cholesky_inverse(H, out=H)
    torch.linalg.cholesky(H, upper=True, out=H)
    return InverseHessian(importance, dead, perm, H)


GPTQ_SLAB = 1 << 24  # elements of a weight swept at a time (64 MB in float32)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor | InverseHessian, bits: int, group_size: int = -1,
                  symmetric: bool = True, scale_dtype: str = "float16", damp: float = 0.01, act_order: bool = True,
                  block_size: int = 128, clip_search: bool = True) -> QuantizedWeight:
    """Quantize ``w`` ``(out, in)`` given ``hessian`` ``(in, in)`` = mean of ``x x^T`` over calibration tokens.

    Pass an :class:`InverseHessian` (``damp``/``act_order`` are then its own) to share one
    factorization between the weights that read the same input.  Output rows are
    independent given the Hessian, so ``w`` (in any float dtype: a bf16 checkpoint's
    tensor as stored) is swept a slab of rows at a time, in float32: a 49,152-row lm_head
    needs a slab of working memory, not four float32 copies of itself.
    """
    inv = hessian if isinstance(hessian, InverseHessian) else inverse_hessian(hessian, damp, act_order)
    out_f, in_f = w.shape
    gs = resolve_group_size(group_size, in_f)
    if in_f % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {in_f}")
    sdtype = SCALE_DTYPES[scale_dtype]
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    scales, zeros = [], []
    step = max(1, GPTQ_SLAB // in_f)
    for r in range(0, out_f, step):
        slab = w[r:r + step].detach().to(torch.float32, copy=True)
        slab[:, inv.dead] = 0.0
        if clip_search:
            scale, zero = search_grid(slab, inv.importance, bits, gs, symmetric, sdtype, mirrored=True)
        else:
            scale, zero = grid_params(slab.reshape(-1, in_f // gs, gs), bits, symmetric, sdtype, mirrored=True)
        codes[r:r + step, inv.perm] = _sweep(slab.T[inv.perm], inv.hinv, scale, zero, inv.perm // gs, bits,
                                             block_size).T
        scales.append(scale)
        zeros.append(zero)
    return quantized_weight(codes, torch.cat(scales), torch.cat(zeros), bits, gs, symmetric, sdtype, "gptq",
                            {"scale_dtype": scale_dtype, "damp": damp, "act_order": act_order,
                             "clip_search": clip_search})


def _sweep(WT: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_of: torch.Tensor,
           bits: int, block_size: int) -> torch.Tensor:
    """The column sweep over ``WT`` ``(in, out)``, rows in visiting order (updated in place): uint8 codes, same layout.

    Each input column is one contiguous row: inside a block each column's error moves onto
    the block's later columns (an in-place rank-1 update on one thread: thousands of small
    ops), and at the end of a block the block's errors move onto every later column in one
    in-place matrix product, on all threads.
    """
    in_f = WT.shape[0]
    codes = torch.empty(WT.shape, dtype=torch.uint8)
    scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w_blk = WT[i1:i2]
        err_blk = torch.empty_like(w_blk)
        h_blk = hinv[i1:i2, i1:i2]
        s_blk, z_blk = scale_t[group_of[i1:i2]], zero_t[group_of[i1:i2]]
        with single_thread():
            for i in range(i2 - i1):
                q = quantize_codes(w_blk[i], s_blk[i], z_blk[i], bits)
                codes[i1 + i] = q
                torch.div(w_blk[i] - (q - z_blk[i]) * s_blk[i], h_blk[i, i], out=err_blk[i])
                w_blk[i:].addr_(h_blk[i, i:], err_blk[i], alpha=-1.0)
        if i2 < in_f:
            WT[i2:].addmm_(hinv[i1:i2, i2:].T, err_blk, alpha=-1.0)
    return codes


def output_error(w: torch.Tensor, q: QuantizedWeight, hessian: torch.Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)``: the expected squared output error the methods minimise."""
    d = (w.float() - q.dequantize()).double()
    return float(torch.einsum("oi,ij,oj->", d, hessian.double(), d))
