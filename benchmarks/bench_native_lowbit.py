"""tokopt's native low-bit kernel against torch's own CPU kernels and float32, on SmolLM2's matrix shapes.

One process, the same random codes for every kernel of a format, interleaved rounds, medians.
Per shape and input rows: microseconds per product and the weight bytes read per second — the
figure a decode step at batch 1 is bound by.  Kernels:

- ``native int4`` / ``native int8``: :mod:`tokopt.backends.torch.native` on the IR's packed codes
  (g32 int4 with bfloat16 scales; per-channel int8), float32 inputs; past ``GEMV_ROWS`` input rows
  the session's path (dequantize once per call, then a float32 GEMM);
- ``int4pack`` / ``int8pack``: ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm``
  (bfloat16 inputs, what the session used before the native kernel);
- ``fp32``: ``x @ w.T`` on a float32 weight.

Run::

    python benchmarks/bench_native_lowbit.py [--threads 2] [--rows 1,4,8,16,128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokopt.backends.torch.lowbit import NativeLinear
from tokopt.backends.torch.native import load_kernel
from tokopt.passes.quant.rtn import quantize_rtn

#: (out, in) of SmolLM2-135M's Linears: q/o, k/v, gate/up, down, the tied lm_head
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]


def timed(fn, budget_s: float = 0.05) -> float:
    """Median microseconds of ``fn`` over repeats filling about ``budget_s``."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(3, min(200, int(budget_s / once)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def kernels(out_f: int, in_f: int, rows: int) -> dict[str, tuple]:
    """name -> (callable, weight bytes it reads)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen)
    x = torch.randn(rows, in_f, generator=gen)
    xb = x.bfloat16()
    q4 = quantize_rtn(w, 4, 32, True, "bfloat16")
    q8 = quantize_rtn(w, 8, -1, True, "bfloat16")
    n4, n8 = NativeLinear(q4), NativeLinear(q8)
    packed4 = torch._convert_weight_to_int4pack_for_cpu(q4.codes().to(torch.int32).contiguous(), 1)
    sz = torch.stack([q4.scales, torch.zeros_like(q4.scales)], -1).transpose(0, 1).contiguous()
    w8, s8 = (q8.codes() - 128).to(torch.int8).contiguous(), q8.scales[:, 0].contiguous()
    return {
        "native int4": (lambda: n4.matmul(x), q4.nbytes),
        "int4pack": (lambda: torch._weight_int4pack_mm_for_cpu(xb, packed4, 32, sz), q4.nbytes),
        "native int8": (lambda: n8.matmul(x), q8.nbytes),
        "int8pack": (lambda: torch._weight_int8pack_mm(xb, w8, s8), q8.nbytes),
        "fp32": (lambda: x @ w.T, w.numel() * 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,8,16,128", help="input rows (tokens) per product, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if load_kernel() is None:
        raise SystemExit("the native kernel did not build here (see the log); nothing to compare")
    print(f"{'shape':>12}{'rows':>6}  " + "".join(f"{k:>22}" for k in kernels(16, 32, 1)))
    for out_f, in_f in SHAPES:
        for rows in (int(r) for r in args.rows.split(",")):
            ks = kernels(out_f, in_f, rows)
            runs: dict[str, list[float]] = {k: [] for k in ks}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, (fn, _) in ks.items():
                        runs[name].append(timed(fn))
            cells = []
            for name, (_, nbytes) in ks.items():
                us = statistics.median(runs[name])
                cells.append(f"{us:>9.0f} us {nbytes / us / 1e3:>5.1f} GB/s")
            print(f"{out_f:>5}x{in_f:<6}{rows:>6}  " + "".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
