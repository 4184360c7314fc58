"""Mixed precision: which format each weight tensor gets, from its measured sensitivity and a budget.

Every tensor has candidate formats (e.g. int4 g32 and int8 per-channel), each with its stored
bytes and its estimated KL (:mod:`tokopt.passes.quant.sensitivity`).  Treating the KLs as
additive, the cheapest mix within a bit budget — or the smallest mix within a KL budget — is a
multiple-choice knapsack; the greedy on each tensor's lower convex hull (take the upgrade that
buys the most KL per byte first) is optimal up to the last, partly fitting, upgrade.  The same
upgrade machinery places bits in a *given* order, which is how the benchmark builds the baselines
the allocator must beat (a random order, and "first and last layers first").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    """A weight format: bits, input columns per scale (``in_features`` = per-channel), symmetry."""

    bits: int
    group_size: int
    symmetric: bool

    @property
    def label(self) -> str:
        return f"int{self.bits} g{self.group_size}{'' if self.symmetric else ' asym'}"

    def nbytes(self, shape: tuple[int, ...], scale_bytes: int) -> int:
        """Stored bytes of an ``(out, in)`` weight (or an ``(E, out, in)`` stack): packed codes, one scale (and
        uint8 zero) per group."""
        out_f, in_f = math.prod(shape[:-1]), shape[-1]
        groups = out_f * (in_f // self.group_size)
        return out_f * in_f * self.bits // 8 + groups * (scale_bytes + (0 if self.symmetric else 1))


@dataclass(frozen=True)
class Candidate:
    """One format for one tensor: what it stores and what it is estimated to cost."""

    format: Format
    nbytes: int
    kl: float


def hull(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates on the lower convex hull of (bytes, KL), cheapest first.

    A candidate both larger and worse than another is never worth taking; one above the hull is
    beaten by a mix of its neighbours, which the greedy reaches through them.
    """
    points: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.nbytes, c.kl)):
        if points and c.kl >= points[-1].kl:
            continue  # more bytes, no less KL
        while len(points) >= 2:
            a, b = points[-2], points[-1]
            # b lies on or above the segment a→c: drop it
            if (b.kl - a.kl) * (c.nbytes - a.nbytes) >= (c.kl - a.kl) * (b.nbytes - a.nbytes):
                points.pop()
            else:
                break
        points.append(c)
    return points


@dataclass
class Allocation:
    """The chosen format per tensor, with the totals the budget was checked against."""

    choice: dict[str, Candidate]
    nbytes: int
    kl: float


def allocate(candidates: dict[str, Sequence[Candidate]], max_bytes: int | None = None,
             max_kl: float | None = None) -> Allocation:
    """The mix with the least total KL within ``max_bytes``, or the fewest bytes within ``max_kl``.

    Starts from every tensor's cheapest format and takes upgrades in order of KL saved per byte.
    With ``max_bytes``, an upgrade that does not fit is skipped (a smaller one elsewhere may);
    with ``max_kl``, upgrades stop once the total is within it.  Neither: the cheapest mix.
    """
    hulls = {name: hull(c) for name, c in candidates.items()}
    level = dict.fromkeys(hulls, 0)
    steps = []
    for name, h in hulls.items():
        for i in range(1, len(h)):
            saved, cost = h[i - 1].kl - h[i].kl, h[i].nbytes - h[i - 1].nbytes
            steps.append((saved / max(cost, 1), name, i))
    steps.sort(key=lambda s: -s[0])  # hull steps of one tensor come out in order: their ratios decrease
    total = sum(h[0].nbytes for h in hulls.values())
    kl = sum(h[0].kl for h in hulls.values())
    for _, name, i in steps:
        if max_kl is not None and kl <= max_kl:
            break
        if level[name] != i - 1:
            continue  # an earlier step of this tensor did not fit
        h = hulls[name]
        extra = h[i].nbytes - h[i - 1].nbytes
        if max_bytes is not None and total + extra > max_bytes:
            continue
        level[name] = i
        total += extra
        kl -= h[i - 1].kl - h[i].kl
    return Allocation({name: hulls[name][lv] for name, lv in level.items()}, total, kl)


def allocate_in_order(candidates: dict[str, Sequence[Candidate]], order: Iterable[str], max_bytes: int) -> Allocation:
    """Baseline policies: upgrade tensors to their *largest* format in ``order`` while the budget allows.

    Ignores the estimates when choosing (they only fill in the returned totals): what the
    allocator is measured against.
    """
    choice = {name: min(c, key=lambda c: c.nbytes) for name, c in candidates.items()}
    total = sum(c.nbytes for c in choice.values())
    for name in order:
        best = max(candidates[name], key=lambda c: c.nbytes)
        extra = best.nbytes - choice[name].nbytes
        if total + extra <= max_bytes:
            choice[name] = best
            total += extra
    return Allocation(choice, total, sum(c.kl for c in choice.values()))
