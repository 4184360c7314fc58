"""Bits placed where they matter: the quantize pass's budgeted mix of 4- and 8-bit tensors.

For each planned tensor this measures (on calibration text) the estimated KL of storing it in
each candidate format (:func:`formats_for`: the base format the options ask for, the same bits
in larger groups, int8) — then lets :func:`~tokopt.passes.quant.allocate.allocate` pick the mix that meets the budget
(``budget_bits`` averaged over every weight of the model, scales and zeros included, or
``max_kl``).  The per-tensor table goes to the report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

from tokopt.errors import PassOptionError
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import weight_nbytes, weight_shape
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.quant.allocate import Allocation, Candidate, Format, allocate
from tokopt.passes.quant.rtn import fake_quantize, resolve_group_size
from tokopt.passes.quant.sensitivity import estimate_kl
from tokopt.passes.quant.weights import Target

log = logging.getLogger(__name__)

SCALE_BYTES = {"float16": 2, "float32": 4}
UPGRADE_BITS = 8


#: The largest group a cheaper candidate may use: past it one scale spans too many weights to be worth its bytes.
MAX_GROUP = 128


def formats_for(t: Target, in_features: int, act_blocks: bool = False) -> list[Format]:
    """The candidates for one tensor, its planned format first.

    Below 8 bits: the planned format; the same bits in groups 2x and 4x as large (up to
    :data:`MAX_GROUP`), cheaper for tensors that barely notice; each of those with the other
    symmetry (zero points cost a byte per group and often buy more than a smaller group: GPTQ
    int4 g64 with zero points measured +10.8 % ppl on SmolLM2 at 4.38 bits/param, symmetric g32
    +13.0 % at 4.51); int8 (symmetric) on the planned groups and per channel for the tensors that
    need it.  The allocator picks along each tensor's hull, so a format that buys nothing over its
    neighbours is simply never chosen.

    ``act_blocks``: the Linears quantize their inputs at run time in blocks of their weight's group
    (``act_bits``), so int8 takes the larger groups instead of per channel: a per-channel group would
    quantize a whole input row with one scale, and onnxruntime's int8 kernel (MatMulNBits, accuracy
    level 4) runs only power-of-two blocks — per channel it fell back to two float-accuracy 4-bit
    planes behind a standard-op activation quantizer: 195 µs a plane for a 1536x576 matrix against
    59 µs for int8 in groups of 64 and 73 µs for int4 in groups of 32 at accuracy level 4
    (``python benchmarks/bench_matmulnbits_formats.py``, one run).
    """
    gs = resolve_group_size(t.group_size, in_features)
    base = Format(t.bits, gs, t.symmetric)
    if t.bits >= UPGRADE_BITS:
        return [base]
    groups = [gs, *(g for g in (2 * gs, 4 * gs) if g <= MAX_GROUP and in_features % g == 0)]
    low = [Format(t.bits, g, sym) for sym in (t.symmetric, not t.symmetric) for g in groups]
    int8_groups = groups if act_blocks else [gs, in_features]
    upgrades = [Format(UPGRADE_BITS, g, True) for g in dict.fromkeys(int8_groups)]
    return [*low, *upgrades]


def model_params(g: Graph) -> int:
    return sum(math.prod(weight_shape(w)) for w in g.params.values())


def byte_budget(g: Graph, targets: list[Target], budget_bits: float) -> int:
    """Bytes the planned tensors may take so the whole model averages ``budget_bits`` per parameter."""
    planned = {t.param for t in targets}
    fixed = sum(weight_nbytes(w) for name, w in g.params.items() if name not in planned)
    return int(budget_bits * model_params(g) / 8) - fixed


def check_budget(g: Graph, targets: list[Target], budget_bits: float, scale_dtype: str,
                 act_blocks: bool = False) -> None:
    """Refuse, before any calibration, a bit budget that even the all-base mix exceeds."""
    cheapest = sum(min(c.nbytes for c in cs) for cs in candidates_for(g, targets, scale_dtype,
                                                                       act_blocks=act_blocks).values())
    if cheapest > byte_budget(g, targets, budget_bits):
        planned = {t.param for t in targets}
        fixed = sum(weight_nbytes(w) for name, w in g.params.items() if name not in planned)
        floor = 8 * (cheapest + fixed) / model_params(g)
        raise PassOptionError(
            f"quantize: budget_bits={budget_bits:g} is below what the model takes with every planned tensor in its "
            f"cheapest format ({floor:.3f} bits/param with {scale_dtype} scales); raise budget_bits, or use larger "
            "groups (group_size=64 or 128) for a cheaper base format")


def candidates_for(g: Graph, targets: list[Target], scale_dtype: str,
                   est: dict[str, dict[str, float]] | None = None, act_blocks: bool = False,
                   ) -> dict[str, list[Candidate]]:
    """Each target's candidate formats with their stored bytes and estimated KL (0 when not estimated; a
    tensor ``est`` leaves out keeps only its base format); ``act_blocks`` as in :func:`formats_for`."""
    sb = SCALE_BYTES[scale_dtype]
    out = {}
    for t in targets:
        shape = weight_shape(g.params[t.param])
        measured = est is not None and t.param in est
        formats = formats_for(t, shape[-1], act_blocks)
        formats = formats if est is None or measured else formats[:1]
        out[t.param] = [Candidate(f, f.nbytes(shape, sb), est[t.param][f.label] if measured else 0.0)
                        for f in formats]
    return out


def plan_mixed(g: Graph, targets: list[Target], ctx: PassContext, o: dict[str, Any]) -> tuple[list[Target],
                                                                                            list[dict], str]:
    """Targets with the allocated formats, the sensitivity table for the report, and the note.

    MoE expert stacks keep the base format: they count against the budget, but the sensitivity is measured
    per Linear (the allocator places the bits among the Linears and the embedding)."""
    scale_dtype = o["scale_dtype"]
    shapes = {t.param: weight_shape(g.params[t.param]) for t in targets}
    act_blocks = bool(o["act_blocks"])
    options = {t.param: formats_for(t, shapes[t.param][-1], act_blocks) for t in targets if len(shapes[t.param]) == 2}

    def quantizer(f: Format):
        return lambda w: fake_quantize(w, f.bits, f.group_size, f.symmetric, scale_dtype)

    batches = ctx.calibration(g, o["sensitivity_samples"], o["calibration_seq_len"], "quantize (sensitivity)")
    est = estimate_kl(g, batches, {p: {f.label: quantizer(f) for f in fs} for p, fs in options.items()},
                      seed=ctx.seed, progress=ctx.progress)
    candidates = candidates_for(g, targets, scale_dtype, est, act_blocks)
    max_bytes = None if o["budget_bits"] is None else byte_budget(g, targets, o["budget_bits"])
    chosen: Allocation = allocate(candidates, max_bytes=max_bytes, max_kl=o["max_kl"])
    new = [replace(t, bits=chosen.choice[t.param].format.bits, group_size=chosen.choice[t.param].format.group_size,
                   symmetric=chosen.choice[t.param].format.symmetric) for t in targets]
    table = []
    for t in targets:
        if t.param not in options:
            continue
        n = math.prod(shapes[t.param])
        c = chosen.choice[t.param]
        table.append({"tensor": t.param, "params": n, "chosen": c.format.label,
                      "bits_per_param": round(8 * c.nbytes / n, 4),
                      "est_kl": {f.label: est[t.param][f.label] for f in options[t.param]}})
    table.sort(key=lambda r: -max(r["est_kl"].values()))
    upgraded = [t for t in new if t.param in options and t.bits == UPGRADE_BITS
                and options[t.param][0].bits != UPGRADE_BITS]
    wider = [t for t in new if t.param in options and t.bits == options[t.param][0].bits
             and t.group_size > options[t.param][0].group_size]
    budget = f"budget_bits={o['budget_bits']:g}" if o["budget_bits"] is not None else f"max_kl={o['max_kl']:g}"
    note = (f"mixed precision ({budget}, sensitivity on {len(batches)} × {batches[0].shape[-1]} calibration "
            f"tokens): {len(upgraded)} of {len(new)} tensors in int{UPGRADE_BITS} "
            f"({sum(math.prod(shapes[t.param]) for t in upgraded) / 1e6:.1f} M params: "
            f"{', '.join(t.param for t in upgraded[:6])}{' …' if len(upgraded) > 6 else ''}), {len(wider)} in "
            f"larger groups than asked; "
            f"estimated KL {chosen.kl:.4f} nats/token")
    log.info(note)
    return new, table, note
