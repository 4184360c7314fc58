"""``tokopt sweep`` on SmolLM2-135M: 12 pipelines, one worker against two on local Ray, side by side.

Runs the same grid twice into fresh directories (no cache), ``--workers 1`` (in process) then
``--workers 2`` (local Ray), with speed measurement off so that only the trials are timed, then a third
time with ``--workers 2`` into the second directory to show the resume (every trial from the cache).
Prints the wall times and their ratio (the issue's bar: two workers <= 0.65x one).  Run::

    python benchmarks/bench_sweep.py          # ~23 minutes on 2 cores
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = "quantize:bits=4|8,group_size=32|64,sparse-attention?:window=128|256"
COMMON = ["--eval-tokens", "4x128", "--calib-tokens", "4x128", "--long-context", "512", "--speed", "off",
          "--max-ppl-increase", "15", "--json"]


def run(out: Path, workers: int) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tokopt.cli", "sweep", "smollm2", "--grid", GRID, "-o", str(out),
                           "--workers", str(workers), *COMMON], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"sweep failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - started, json.loads(done.stdout)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="tokopt-bench-sweep-"))
    one, s1 = run(root / "one", 1)
    two, s2 = run(root / "two", 2)
    again, s3 = run(root / "two", 2)
    print(f"grid {GRID!r}: {len(s1['trials'])} pipelines (ok {s1['counts']['ok']}, failed {s1['counts']['failed']})")
    print(f"workers 1 (in process): {one:.0f} s (trials {s1['seconds']['trials']:.0f} s)")
    print(f"workers 2 (local Ray):  {two:.0f} s (trials {s2['seconds']['trials']:.0f} s)")
    print(f"ratio two/one: {two / one:.3f} wall, {s2['seconds']['trials'] / s1['seconds']['trials']:.3f} trials")
    print(f"re-run into the second directory: {again:.0f} s, {s3['counts']['cached']} of {len(s3['trials'])} cached")
    best = s2["best"]
    print(f"cheapest within +15 %: {best['passes'] if best else None}")
    for t in sorted(s2["trials"], key=lambda t: t["metrics"].get("weight_bytes") or 0):
        m = t["metrics"]
        print(f"  {t['passes']:<62} Δppl {m['ppl_delta_pct']:+7.2f}%  weights {m['weight_bytes'] / 1e6:7.1f} MB  "
              f"KV@2048 {m['kv_bytes_at_2048'] / 1e6:6.1f} MB  {t['seconds']:.0f} s")
    print(f"pages: {root / 'two' / 'sweep.html'}")


if __name__ == "__main__":
    main()
