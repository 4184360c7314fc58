"""Weight quantization for the ``quantize`` pass: RTN, or GPTQ calibrated block by block.

Weights become :class:`~tokopt.optimizer.ir.weights.QuantizedWeight` values (packed codes, scales,
zero points) that every executor dequantizes exactly.  GPTQ runs the model one block at a time on
calibration text (:class:`~tokopt.passes.quant.calibration.BlockwiseRunner`), so memory stays one
block deep and later blocks are calibrated on the already quantized ones.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokopt.optimizer.ir.graph import Graph, Node, Value
from tokopt.optimizer.ir.spill import SpilledQuantizedWeight, SpillFile
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize, streams, weight_shape
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.quant.calibration import BlockwiseRunner
from tokopt.passes.quant.gptq import gptq_quantize, inverse_hessian, search_grid
from tokopt.passes.quant.rtn import SCALE_DTYPES, quantize_codes, quantize_rtn, quantized_weight, resolve_group_size

log = logging.getLogger(__name__)

#: Ridge of the drift fit, as a fraction of the Hessian's mean diagonal: strong, so the correction follows the
#: inputs' main directions and not the calibration text's rare ones (measured: 0.01 / 0.1 fit the calibration
#: text's kind of text and lost on English prose, 1.0 gained on both).
DRIFT_DAMP = 1.0
#: Calibration tokens per input feature below which ``fp_target`` is off by default (SmolLM2's default
#: calibration has 16,384 tokens for inputs up to 1,536 wide).
DRIFT_TOKENS_PER_INPUT = 4


@dataclass(frozen=True)
class Target:
    """One parameter to quantize and the nodes that read it."""

    param: str
    nodes: tuple[str, ...]
    bits: int
    calibrate: bool  # GPTQ through a Linear's inputs (False: grid fitted on the weight alone)
    group_size: int = -1  # input columns per scale; -1: per output channel
    symmetric: bool = True


def planned_weight(shape: tuple[int, ...], bits: int, group_size: int, symmetric: bool,
                   scale_dtype: str = "float16") -> QuantizedWeight:
    """A :class:`QuantizedWeight` with the format quantization will produce and placeholder (meta) tensors."""
    out_f, in_f = math.prod(shape[:-1]), shape[-1]
    gs = resolve_group_size(group_size, in_f)
    meta = {"device": "meta"}
    groups = in_f // gs
    return QuantizedWeight(torch.empty(out_f, in_f * bits // 8, dtype=torch.uint8, **meta),
                           torch.empty(out_f, groups, dtype=SCALE_DTYPES[scale_dtype], **meta),
                           None if symmetric else torch.empty(out_f, groups, dtype=torch.uint8, **meta),
                           bits, gs, tuple(shape), method="planned")


def untie(g: Graph, targets: list[Target]) -> list[str]:
    """Give selected readers of a tensor also read by unselected nodes their own copy."""
    readers: dict[str, set[str]] = {}
    for name in g.nx.nodes:
        for param in g.node(name).params.values():
            readers.setdefault(param, set()).add(name)
    untied = []
    for t in targets:
        if readers.get(t.param, set()) <= set(t.nodes):
            continue
        copy_name = f"{t.param}.int{t.bits}"
        g.params[copy_name] = g.params[t.param]
        for name in t.nodes:
            node = g.node(name)
            node.params = {r: (copy_name if p == t.param else p) for r, p in node.params.items()}
        readers[t.param] -= set(t.nodes)
        readers.setdefault(copy_name, set()).update(t.nodes)
        untied.append(t.param)
    return untied

def quantize_weights(g: Graph, targets: list[Target], ctx: PassContext, o: dict[str, Any],
                     method: str) -> tuple[int, bool]:
    """Quantize every target in place in ``g`` (a copy the pass owns); returns how many, and whether GPTQ fitted
    the layers to the float model's output (:func:`fits_float_model`)."""
    sdtype = SCALE_DTYPES[o["scale_dtype"]]
    calibrated = [t for t in targets if t.calibrate]
    keep = _keeper(g)
    original = dict(g.params)  # the float model: GPTQ's targets when it corrects for its inputs' drift
    for t in targets:
        if t in calibrated:
            continue
        stacked = materialize(g.params[t.param])  # as stored (bf16 stays bf16): RTN converts a slab at a time
        w = stacked.reshape(-1, stacked.shape[-1])  # MoE experts: every row of every expert on its own
        if method == "gptq":  # no Linear reads it (an embedding, experts): fit the grid on the weight itself
            w = w.float()
            gs = resolve_group_size(t.group_size, w.shape[1])
            scale, zero = search_grid(w, torch.ones(w.shape[1]), t.bits, gs, t.symmetric, sdtype,
                                      mirrored=o.get("mirrored", False))
            q = _from_grid(w, scale, zero, t.bits, gs, t.symmetric, o["scale_dtype"])
        else:
            q = quantize_rtn(w, t.bits, t.group_size, t.symmetric, o["scale_dtype"], mirrored=o.get("mirrored", False))
        g.params[t.param] = keep(q.stacked(tuple(stacked.shape)))
    fitted = _gptq(g, calibrated, ctx, o, keep, original) if calibrated else False
    return len(targets), fitted


def _keeper(g: Graph) -> Callable[[QuantizedWeight], QuantizedWeight]:
    """Where the pass keeps what it quantizes: in memory, or — for a model past the memory budget, whose
    codes alone would fill it — in a temporary file (:mod:`tokopt.optimizer.ir.spill`)."""
    if not streams(g.params):
        return lambda q: q
    spill = SpillFile()
    log.info("quantized weights are kept in a temporary file: the model is past the memory budget")
    return lambda q: SpilledQuantizedWeight.of(q, spill)


def fits_float_model(g: Graph, o: dict[str, Any], tokens: int, widest: int) -> bool:
    """Whether GPTQ fits each layer to the float model's output (``fp_target``).  By default yes, unless the
    model is past the memory budget (the float model's run would read its weights a second time per block) or
    the calibration text has fewer tokens than :data:`DRIFT_TOKENS_PER_INPUT` per input feature of the widest
    Linear (the fit would be underdetermined: it would chase the calibration text's noise)."""
    if o.get("fp_target") is not None:
        return bool(o["fp_target"])
    return not streams(g.params) and tokens >= DRIFT_TOKENS_PER_INPUT * widest


def _gptq(g: Graph, targets: list[Target], ctx: PassContext, o: dict[str, Any],
          keep: Callable[[QuantizedWeight], QuantizedWeight], original: dict[str, Any]) -> bool:
    given = ctx.calibration_batches  # all of the pipeline's text, as cut; else the option's sizes
    batches = ctx.calibration(g, len(given) or o["calibration_samples"],
                              given[0].shape[-1] if given else o["calibration_seq_len"], "quantize")
    runner = BlockwiseRunner(g, batches)
    for name, w in g.params.items():  # tensors quantized without calibration: later blocks see their error
        if isinstance(w, QuantizedWeight):
            runner.set_weight(name, w)
    owner = {n: t for t in targets for n in t.nodes if g.node(n).op == "Linear"}
    pending = {t.param for t in targets}
    # the float model's run on the same batches (on a subset of them the fit measured worse on prose); a tensor
    # tied to an embedding keeps its own target, since its rows are also looked up as they are
    widest = max((weight_shape(g.params[t.param])[-1] for t in owner.values()), default=0)
    fit = bool(owner) and fits_float_model(g, o, sum(b.numel() for b in batches), widest)
    reference = BlockwiseRunner(g, batches, params=original) if fit else None
    refit = {n for n, t in owner.items() if all(g.node(m).op == "Linear" for m in t.nodes)} if reference else set()
    uncaptured = set(refit)
    float_inputs: dict[Value, list[torch.Tensor]] = {}

    def capture(node: Node) -> bool:
        """Keep the float model's input of every Linear to refit (the runner frees it otherwise); stop when
        none is left."""
        if node.name in uncaptured:
            value = reference.input_value(node.name)
            float_inputs.setdefault(value, reference.values(value))
            uncaptured.discard(node.name)
        return not uncaptured

    def before(node: Node) -> bool:
        """Quantize every pending weight reading this node's input, from the inputs as they are now; stop when
        nothing is left to calibrate (the rest of the model — a vocabulary-wide lm_head — need not run)."""
        t = owner.get(node.name)
        if t is None or t.param not in pending:
            return not pending
        value = runner.input_value(node.name)
        readers = [n for n in owner if runner.input_value(n) == value]  # q/k/v share one Hessian
        refitted = any(n in refit for n in readers)
        hessian, cross = runner.moments(value, float_inputs[value] if refitted else None)
        inverse = inverse_hessian(hessian, o["damp"], o["act_order"])
        drift = _drift(hessian, cross) if refitted else None
        for name in readers:
            t = owner[name]
            if t.param not in pending:
                continue
            w = materialize(g.params[t.param])  # as stored: GPTQ takes float32 slabs of it
            if name in refit:
                w = w.float()
                w = w + w @ drift
            q = gptq_quantize(w, inverse, t.bits, t.group_size, t.symmetric, o["scale_dtype"],
                              damp=o["damp"], act_order=o["act_order"])
            g.params[t.param] = q = keep(q)
            runner.set_weight(t.param, q)
            pending.discard(t.param)
        return not pending

    for idx in ctx.progress(range(len(runner.segments)), desc="gptq"):
        if not pending:
            break
        started = time.perf_counter()
        left = len(pending)
        if reference is not None:
            float_inputs.clear()
            reference.run(idx, capture)
        runner.run(idx, before)
        log.info("gptq segment %d/%d (%s): %d tensor(s) in %.1f s", idx + 1, len(runner.segments),
                 runner.segments[idx][0].name, left - len(pending), time.perf_counter() - started)
    return reference is not None


def _drift(hessian: torch.Tensor, cross: torch.Tensor, damp: float = DRIFT_DAMP) -> torch.Tensor:
    """``M`` such that ``W + W M`` is the float layer's output fitted from the quantized model's inputs.

    With ``X`` the inputs the layer sees in the quantized model and ``X'`` the float model's, the least-squares
    ``W*`` minimizing ``|X W*^T - X' W^T|`` is ``W (X'^T X) (X^T X)^-1`` = ``W + W (C - H) H^-1`` (``H`` the
    Hessian, ``C`` the cross moment ``mean x' x^T``); ``|X Q^T - X' W^T|`` = ``|X (Q - W*)^T|`` + a constant,
    so GPTQ on ``W*`` with ``H`` minimizes the error against the float model rather than against the layer as
    it would run on drifted inputs (GPTAQ's asymmetric calibration).  ``H`` is damped by ``damp`` times its mean
    diagonal (:data:`DRIFT_DAMP`, a ridge far stronger than GPTQ's own).
    """
    damped = hessian + damp * float(torch.diagonal(hessian).double().mean()) * torch.eye(hessian.shape[0])
    # float32 is enough with a ridge this strong (1,536-wide test systems: within 1e-6 of float64, in half the time)
    factor = torch.linalg.cholesky(damped)
    return torch.cholesky_solve((cross - hessian).T.contiguous(), factor).T


def _from_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
               symmetric: bool, scale_dtype: str) -> QuantizedWeight:
    out_f, in_f = w.shape
    grouped = w.reshape(out_f, in_f // group_size, group_size)
    codes = quantize_codes(grouped, scale[..., None], zero[..., None], bits).reshape(out_f, in_f)
    return quantized_weight(codes, scale, zero, bits, group_size, symmetric, SCALE_DTYPES[scale_dtype], "mse",
                            {"scale_dtype": scale_dtype})
