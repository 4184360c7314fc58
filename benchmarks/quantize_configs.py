"""Try quantize-pass configurations on SmolLM2: bits/param and Δppl on docstrings and on English prose.

Run:  python benchmarks/quantize_configs.py '{"bits": 4, "group_size": 32}' '{"bits": 4, "budget_bits": 4.75}'
      --seqs 4 (sequences of 512 tokens per text; default 4, the benchmarks use 8)
      --calib-offset N (calibrate on the calibration text's sequences of 512 tokens from the N-th on, as many
      as the config's calibration_samples; default: the pass's own choice, the first ones)
      --seeds 0,1,2 (run each config once per seed — the rotation's random signs — and print the mean and
      range: GPTQ's outcome moves by points of Δppl with perturbations of 1e-6 in its calibration)

Each argument is the pass's options as JSON.  Every row is measured against the fp32 baseline on the
same tokens: the default eval text (standard-library docstrings) and ``/usr/share/common-licenses/GPL-3``.
The exploratory figures in the issue notes (damping, calibration size) come from this script.
"""

from __future__ import annotations

import argparse
import json
import time

import tokopt
from tokopt.measure.quality import perplexity
from tokopt.optimizer import corpus
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.quantize import QuantizePass

PROSE = "/usr/share/common-licenses/GPL-3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="quantize options as JSON")
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--calib-offset", type=int, default=None)
    parser.add_argument("--seeds", default="0", help="comma-separated PassContext seeds")
    args = parser.parse_args()
    graph = tokopt.load("smollm2")
    tok = corpus.tokenizer_for(graph)
    texts = {"doc": corpus.default_eval_text(), "prose": corpus.file_text(PROSE)}
    evals = {k: corpus.fixed_batches(corpus.tokenize(t, tok, graph.meta.vocab_size), args.seqs, 512, "eval")
             for k, t in texts.items()}

    def ppl(g) -> dict[str, float]:
        forward = ReferenceExecutor(g).forward
        return {k: perplexity(forward, b.split(2)) for k, b in evals.items()}

    base = ppl(graph)
    print(f"fp32: doc {base['doc']:.3f}, prose {base['prose']:.3f} ({args.seqs} x 512 tokens each)")
    seeds = [int(x) for x in args.seeds.split(",")]
    for spec in args.configs:
        opts = json.loads(spec)
        given = None
        if args.calib_offset is not None:
            calib = corpus.tokenize(corpus.default_calibration_text(), tok, graph.meta.vocab_size)
            count = opts.get("calibration_samples", 8)
            start = args.calib_offset * 512
            given = list(corpus.fixed_batches(calib, count, 512, "calibration", offset=start).split(1))
        deltas: dict[str, list[float]] = {"doc": [], "prose": []}
        for seed in seeds:
            started = time.perf_counter()
            q = QuantizePass(**opts).run(graph, PassContext(calibration_batches=given, seed=seed)).graph
            seconds = time.perf_counter() - started
            p = ppl(q)
            for k in deltas:
                deltas[k].append(100 * (p[k] / base[k] - 1))
            print(f"{spec} seed {seed}: {static_metrics(q).bits_per_param:.3f} bits/param, "
                  f"doc {deltas['doc'][-1]:+.2f} %, prose {deltas['prose'][-1]:+.2f} % (quantize {seconds:.0f} s)",
                  flush=True)
        if len(seeds) > 1:
            print(f"{spec} over {len(seeds)} seeds: " + ", ".join(
                f"{k} mean {sum(v) / len(v):+.2f} % (min {min(v):+.2f}, max {max(v):+.2f})" for k, v in deltas.items()),
                flush=True)


if __name__ == "__main__":
    main()
