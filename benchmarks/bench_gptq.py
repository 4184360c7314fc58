"""GPTQ's time on one weight of each shape a Llama-2-7B layer has (random weights, a Hessian from 256 tokens).

What sets GPTQ's cost at 7B (issue 17): the factorization of the input's Hessian (shared by the
weights that read the same input), the clip search and the column sweep.  Each line is the seconds of
one ``gptq_quantize`` call (int4, groups of 32, float32 scales) given the raw Hessian, so the
factorization is counted in every line.  Run::

    python benchmarks/bench_gptq.py        # ~1 minute on 2 cores
"""

from __future__ import annotations

import time

import torch

from tokopt.passes.quant.gptq import gptq_quantize

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # q/k/v/o, gate/up, down: (out, in)


def main() -> None:
    torch.manual_seed(0)
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f) * 0.02
        x = torch.randn(256, in_f)
        hessian = x.T @ x / x.shape[0]
        started = time.perf_counter()
        gptq_quantize(w, hessian, 4, 32, scale_dtype="float32")
        print(f"{out_f:>6} x {in_f:<6} {time.perf_counter() - started:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
