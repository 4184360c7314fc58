"""The torch-compile backend's low-bit weights on SmolLM2, side by side with onnxruntime's artifacts.

Eight artifacts, each written by its backend from the same model, measured alternating in one
process by ``tokopt bench``'s job (:func:`tokopt.jobs.bench.compare`): the torch-compile
backend's fp32, int8 and int4 artifacts (``quantize:bits=8`` / ``quantize:bits=4`` as a user
types them with ``--backend torch-compile``: ``act_dtype=bfloat16`` and bfloat16 scales, run by
``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``), its
``quantize:bits=8,group_size=-1,act_bits=8`` (per-channel int8 codes times int8 inputs per row
on ``torch._int_mm``: "w8a8-rows") and ``quantize:bits=4,symmetric=false`` (zero points, on
tokopt's native kernel: "asym"); onnxruntime's fp32, int8 and int4 as typed (int8
activations).  Printed per artifact: weight bytes on disk, decode tok/s (the bench defaults and
the peers' way: batch 1, 9-token prompt, 128 greedy tokens), the ratio to the same backend's
fp32 artifact, and the issue's bar for it — half the fp32/low-bit bytes ratio.  A torch-compile
session's first load and decode step (compilation) is timed apart.

Run::

    python benchmarks/bench_torch_lowbit.py                 # int4 by RTN: the speed is the format's
    python benchmarks/bench_torch_lowbit.py --method gptq   # what a user gets by default (~4 min more)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import tokopt
from tokopt.backends.artifact import weight_file_bytes
from tokopt.backends.registry import get_backend
from tokopt.jobs.bench import compare
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.quantize import QuantizePass

PROMPT = [1, 504, 3458, 314, 253, 1345, 28, 2219, 30]
W8A8_ROWS = {"group_size": -1, "act_bits": 8}  # int8 codes times int8 inputs per row: torch._int_mm
ASYMMETRIC = {"symmetric": False}  # zero points: no torch kernel takes them, tokopt's native kernel does
VARIANT_LABELS = {repr(W8A8_ROWS): " w8a8-rows", repr(ASYMMETRIC): " asym"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="rtn", choices=("rtn", "gptq"), help="how the int4 codes are chosen")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    graph = tokopt.load("smollm2")
    plan: list[tuple[str, int | None, dict]] = [
        (backend, bits, {}) for backend in ("torch-compile", "onnxruntime") for bits in (None, 8, 4)]
    plan.insert(2, ("torch-compile", 8, W8A8_ROWS))
    plan.insert(4, ("torch-compile", 4, ASYMMETRIC))
    with tempfile.TemporaryDirectory(prefix="tokopt-lowbit-") as tmp:
        paths, labels, compile_s = [], [], {}
        for backend, bits, extra in plan:
            g = graph
            if bits is not None:
                opts = {"bits": bits} | ({"method": args.method} if bits == 4 else {}) | extra
                g = QuantizePass(**opts).run(graph, PassContext(backend=backend, seed=0)).graph
            label = f"{backend} {'fp32' if bits is None else f'int{bits}'}{VARIANT_LABELS.get(repr(extra), '')}"
            path = Path(tmp) / label.replace(" ", "-")
            get_backend(backend).lower(g, path)
            if backend == "torch-compile":
                t0 = time.perf_counter()
                session = get_backend(backend).load(path)
                with torch.inference_mode():
                    cache = session.new_cache()
                    session.forward(torch.tensor([PROMPT]), cache)
                    session.forward(torch.tensor([[PROMPT[-1]]]), cache)
                compile_s[label] = time.perf_counter() - t0
                del session
            paths.append(path)
            labels.append(label)
        result = compare(paths, rounds=args.rounds, speed_options={"peer_decode_tokens": 128})
        sizes = [weight_file_bytes(p) for p in paths]
    rows = []
    for label, size, r in zip(labels, sizes, result["results"], strict=True):
        fp32 = next(i for i, lab in enumerate(labels) if lab == f"{label.split()[0]} fp32")
        base = result["results"][fp32]
        bytes_ratio = sizes[fp32] / size
        rows.append({"artifact": label, "weight_bytes": size, "decode_tok_s": r["decode_tok_s"],
                     "decode_tok_s_peer": r.get("decode_tok_s_peer"),
                     "vs_own_fp32": r["decode_tok_s"] / base["decode_tok_s"],
                     "vs_own_fp32_peer": r["decode_tok_s_peer"] / base["decode_tok_s_peer"],
                     "bar": bytes_ratio / 2, "compile_s": compile_s.get(label)})
    print(f"{'artifact':<26}{'MB':>8}{'decode':>9}{'peer-way':>10}{'vs fp32':>9}{'peer vs fp32':>14}"
          f"{'bar (bytes/2)':>15}{'compile s':>11}")
    for row in rows:
        compiled = f"{row['compile_s']:.1f}" if row["compile_s"] is not None else "-"
        print(f"{row['artifact']:<26}{row['weight_bytes'] / 1e6:>8.1f}{row['decode_tok_s']:>9.1f}"
              f"{row['decode_tok_s_peer']:>10.1f}{row['vs_own_fp32']:>8.2f}x{row['vs_own_fp32_peer']:>13.2f}x"
              f"{row['bar']:>14.2f}x{compiled:>11}")
    print(f"machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} threads; "
          f"{args.rounds} alternating rounds, medians; int4 codes by {args.method}")
    print(json.dumps({"rows": rows, "machine": result["machine"], "rounds": args.rounds}))


if __name__ == "__main__":
    main()
