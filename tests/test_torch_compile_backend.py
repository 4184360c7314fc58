"""The ``torch-compile`` backend: the compiled session from the CLI, honest about its KV memory.

Its capabilities are what the session does: static layers pre-allocate their slots, dynamic ones
grow by blocks, windowed ones stop at their ring of ``sinks + window`` slots, and ``paged``
storage, which it has no pages for, is refused by node and attribute.  A windowed graph
generates far past the session's ``max_len`` with flat KV memory and the reference's tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tokopt
from tokopt.backends.artifact import read_manifest
from tokopt.backends.registry import get_backend
from tokopt.backends.torch import compiled
from tokopt.backends.torch.compiled import CompiledSession
from tokopt.cli import cli
from tokopt.errors import BackendRefusalError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.interpret.decode import greedy_decode
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.kv_memory import reserved_kv_bytes
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.kv_layout import KVLayout
from tokopt.passes.sparse_attention import SparseAttention

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import sample_ids, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WINDOW, SINKS = 8, 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", layers=2)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Graph:
    return tokopt.load(str(tiny_dir))


def decode_with_kv(session, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """Greedy tokens, and the session's measured KV bytes after the prefill and after every step."""
    sizes: list[int] = []

    def forward(ids: torch.Tensor, cache) -> torch.Tensor:
        logits = session.forward(ids, cache)
        sizes.append(session.kv_nbytes(cache))
        return logits

    with torch.inference_mode():
        return greedy_decode(forward, session.new_cache(), prompt, steps), sizes


def test_windowed_generation_runs_past_max_len_with_flat_kv_and_the_reference_tokens(tiny):
    g = SparseAttention(window=WINDOW, sinks=SINKS).run(tiny, PassContext()).graph
    prompt, steps = sample_ids(1, 4), 4 * WINDOW + 8  # well past 3x the window, and past max_len
    tokens, sizes = decode_with_kv(CompiledSession(g, compile=True, max_len=16), prompt, steps)
    expected, ref_sizes = decode_with_kv(ReferenceExecutor(g), prompt, steps)
    assert tokens.shape[1] == steps and torch.equal(tokens, expected)
    full = SINKS + WINDOW - prompt.shape[1]  # the step after which the ring is full
    ring = reserved_kv_bytes(g, [SINKS + WINDOW])
    assert set(sizes[full:]) == set(ref_sizes[full:]) == {ring}  # flat, and the reference's bounded bytes


def test_dynamic_layers_grow_by_blocks_with_one_recompilation(tiny, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled, "GROWTH_BLOCK", 4)
    prompt, steps = sample_ids(1, 3, seed=1), 21
    session = CompiledSession(tiny, compile=True, max_len=32)
    graphs_before = counters["stats"]["unique_graphs"]
    tokens, sizes = decode_with_kv(session, prompt, steps)
    assert torch.equal(tokens, ReferenceExecutor(tiny).generate(prompt, steps))
    per_token = reserved_kv_bytes(tiny, [1])
    assert sizes == [per_token * -(-(prompt.shape[1] + i) // 4) * 4 for i in range(steps)]
    # the first buffer length compiles static, the first growth makes it a dynamic size: no more after that
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2


def test_static_layers_pre_allocate_their_slots(tiny):
    g = KVLayout(storage="static", max_len=24).run(tiny, PassContext()).graph
    _, sizes = decode_with_kv(CompiledSession(g, compile=False), sample_ids(1, 3), 5)
    assert set(sizes) == {reserved_kv_bytes(g, [1])}


def test_refuses_paged_storage_by_node_and_attribute(tiny):
    g = KVLayout(storage="paged", block_size=4).run(tiny, PassContext()).graph
    get_backend("torch").check(g)
    with pytest.raises(BackendRefusalError, match=r"layers\.0\.attn: kv_cache\.storage='paged'"):
        get_backend("torch-compile").check(g)


def test_optimize_and_bench_from_the_cli(tiny_dir, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    passes = f"sparse-attention:window={WINDOW},sinks={SINKS}"
    result = runner.invoke(cli, ["optimize", str(tiny_dir), "--passes", passes, "--backend", "torch-compile",
                                 "-o", str(out), "--json", "--eval-tokens", "2x32", "--calib-tokens", "2x32"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["backend"] == "torch-compile"
    report = json.loads((out / "report.json").read_text())
    assert report["artifact"]["parity"]["passed"]
    assert report["stages"][-1]["metrics"]["kv_bytes_measured"]
    bench = runner.invoke(cli, ["bench", str(out), "--prompt-len", "8", "--decode-tokens", "4", "--batch", "1",
                                "--json"])
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.stdout)["backend"] == "torch-compile"


def test_the_report_says_which_kernel_runs_each_quantized_linear(tiny_dir, tmp_path):
    """Zero points: no torch kernel takes them, the native one does — the report's artifact section counts the
    Linears per kernel, so a weight held in float32 since load ("dequantized") cannot hide behind int4 bits."""
    from tokopt.backends.torch.native import load_kernel

    out = tmp_path / "out"
    passes = "quantize:bits=4,method=rtn,symmetric=false"
    result = CliRunner().invoke(cli, ["optimize", str(tiny_dir), "--passes", passes, "--backend", "torch-compile",
                                      "-o", str(out), "--json", "--eval-tokens", "2x32", "--calib-tokens", "2x32"])
    assert result.exit_code == 0, result.output
    kernels = json.loads((out / "report.json").read_text())["artifact"]["linear_kernels"]
    expected = "native" if load_kernel() is not None else "dequantized"
    assert kernels == {expected: len(tokopt.load(str(tiny_dir)).nodes("Linear"))}
