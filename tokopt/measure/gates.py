"""Quality and speed gates: the last stage against the baseline, each with its verdict.

A build calls ``tokopt optimize`` with limits (``--max-ppl-increase 2``) and reads the exit
code; the message must say which gate failed and by how much, so a person can decide
whether to relax the limit or drop a pass without opening the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Gates:
    max_ppl_increase: float | None = None  # percent
    max_kl: float | None = None
    min_decode_speedup: float | None = None  # final decode tok/s ÷ baseline decode tok/s
    strict: bool = False  # fail when a measured figure of the artifact disagrees with the IR's by > 10 %

    def any(self) -> bool:
        return any(v is not None and v is not False for v in asdict(self).values())

    def merged(self, other: dict[str, Any] | None) -> Gates:
        """These gates, with unset ones taken from ``other`` (a recipe's ``gates:`` mapping)."""
        if not other:
            return self
        unknown = sorted(set(other) - set(asdict(self)))
        if unknown:
            from tokopt.errors import RecipeError

            raise RecipeError(f"recipe gates: unknown key(s) {', '.join(unknown)}; valid: {', '.join(asdict(self))}")
        mine = asdict(self)
        merged = {k: mine[k] if mine[k] is not None else (float(other[k]) if other.get(k) is not None else None)
                  for k in mine if k != "strict"}
        return Gates(**merged, strict=self.strict or bool(other.get("strict")))

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass
class GateResult:
    gate: str  # the CLI spelling, e.g. "--max-ppl-increase"
    limit: float
    value: float | None
    passed: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gates(gates: Gates, baseline: dict[str, Any], final: dict[str, Any],
                mismatches: list[dict[str, Any]] = ()) -> list[GateResult]:
    """Each set gate's verdict; ``mismatches`` (``stage: message``) are what ``--strict`` fails on."""
    results: list[GateResult] = []
    if gates.strict:
        worst = max((abs(m["ratio"] - 1) * 100 for m in mismatches), default=0.0)
        results.append(GateResult(
            "--strict", 10.0, worst, not mismatches,
            "every measured figure of the artifact is within 10 % of the IR's" if not mismatches else
            f"{len(mismatches)} measured figure(s) differ from the IR's by more than 10 %: "
            + "; ".join(m["message"] for m in mismatches[:3])))
    if gates.max_ppl_increase is not None:
        limit, value = gates.max_ppl_increase, final["ppl_delta_pct"]
        ok = value <= limit
        results.append(GateResult(
            "--max-ppl-increase", limit, value, ok,
            f"perplexity rose {value:+.2f}% ({baseline['ppl']:.3f} -> {final['ppl']:.3f}); limit {limit:+.2f}%"
            + ("" if ok else f", over by {value - limit:.2f} points")))
    if gates.max_kl is not None:
        limit, value = gates.max_kl, final["kl"]
        ok = value <= limit
        results.append(GateResult(
            "--max-kl", limit, value, ok,
            f"mean KL(baseline||final) is {value:.5f}; limit {limit:.5f}"
            + ("" if ok else f", over by {value - limit:.5f} ({value / limit:.2f}x the limit)" if limit > 0
               else f", over by {value - limit:.5f}")))
    if gates.min_decode_speedup is not None:
        limit = gates.min_decode_speedup
        base, new = baseline.get("decode_tok_s"), final.get("decode_tok_s")
        if not base or new is None:
            results.append(GateResult("--min-decode-speedup", limit, None, False,
                                      "decode speed was not measured, so the speedup gate cannot pass"))
        else:
            value = new / base
            ok = value >= limit
            results.append(GateResult(
                "--min-decode-speedup", limit, value, ok,
                f"decode is {value:.2f}x the baseline ({base:.1f} -> {new:.1f} tok/s); required {limit:.2f}x"
                + ("" if ok else f", short by {limit - value:.2f}x")))
    return results


__all__ = ["Gates", "GateResult", "check_gates"]
