"""Where a decode step's time goes, by op kind, beside the bandwidth bound (``tokopt bench --profile``).

The speed figures say *how fast*; choosing the next optimization needs *where*: how much
of a step is the low-bit matmuls (bounded by the bytes they read), how much attention,
how much the per-step overhead of everything small.  Torch sessions (the reference
executor, the compiled session) are profiled by :mod:`torch.profiler` (self time per
ATen op or compiled kernel); onnxruntime sessions by onnxruntime's own profiler (per-node
kernel time, read from the trace it writes), so each runtime is timed by its own
instrument.  A torch session's step wall time comes from a separate, unprofiled run
(torch.profiler's per-op overhead is large); onnxruntime's profiler is on for its whole
session, so there the step's wall time is taken with it on, and says so.  The bound is the
time a step would take reading every weight byte once at the machine's measured memory
bandwidth.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from tokopt.measure.speed import prefill_decode

PROMPT = 9  # tokens before the profiled decode steps: the peers' published measurement
STEPS = 32
TOP = 15


def _decode(session: Any, steps: int, around: AbstractContextManager | None = None) -> float:
    """Seconds for ``steps`` greedy decode steps after a :data:`PROMPT`-token prompt (batch 1), the steps
    (not the prompt) run inside ``around``."""
    import torch

    return prefill_decode(session, torch.arange(1, PROMPT + 1).unsqueeze(0), steps, around)[1]


def torch_op_times(session: Any, steps: int) -> dict[str, tuple[float, int]]:
    """``op -> (self seconds, calls)`` over ``steps`` decode steps, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    _decode(session, steps, prof)
    times: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            times[event.key] = (event.self_cpu_time_total / 1e6, int(event.count))
    return times


def onnxruntime_op_times(trace: Path, steps: int) -> dict[str, tuple[float, int]]:
    """``op type -> (kernel seconds, calls)`` over the last ``steps`` runs of an onnxruntime profile (the decode
    steps: the prompt's run before them is left out)."""
    events = json.loads(Path(trace).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e["name"] == "model_run")
    decode = runs[-steps:]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(start <= e["ts"] <= end for start, end in decode):
            continue
        entry = totals[e.get("args", {}).get("op_name", "?")]
        entry[0] += e["dur"] / 1e6
        entry[1] += 1
    return {op: (t, int(n)) for op, (t, n) in totals.items()}


def profile_decode(session: Any, steps: int = STEPS, *, onnxruntime: bool = False, weight_bytes: int | None = None,
                   bandwidth: float | None = None, bytes_source: str = "every weight byte") -> dict[str, Any]:
    """Per-op-kind time of a decode step, the step's wall time, and the bandwidth bound.

    ``onnxruntime``: the session is an onnxruntime one built with profiling on (load option
    ``profile_prefix``); its own trace is read (``end_profiling``).  Otherwise torch profiles it.
    """
    _decode(session, 2)  # warm-up: first-call allocations, a compiled session's compilation
    step_s = _decode(session, steps) / steps  # torch: unprofiled; onnxruntime: its profiler records this run
    if not onnxruntime:
        times, instrument = torch_op_times(session, steps), "torch.profiler (self time per op)"
    else:
        times = onnxruntime_op_times(Path(session.session.end_profiling()), steps)
        instrument = "onnxruntime profiler (kernel time per node, by op type; the step's wall time with it on)"
    total = sum(t for t, _ in times.values()) or 1.0
    ops = [{"op": op, "ms_per_step": 1e3 * t / steps, "calls_per_step": n / steps, "share": t / total}
           for op, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])]
    out: dict[str, Any] = {"steps": steps, "step_ms": 1e3 * step_s, "instrument": instrument,
                           "profiled_ms_per_step": 1e3 * total / steps, "ops": ops[:TOP],
                           "other_ops_share": sum(o["share"] for o in ops[TOP:])}
    if weight_bytes and bandwidth:
        out["bound_ms"] = 1e3 * weight_bytes / bandwidth
        out["bound_note"] = f"{bytes_source} read once per step at the measured memory bandwidth"
    return out
