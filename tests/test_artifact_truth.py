"""The report describes the artifact that ships: measured figures beside analytic ones, disagreement flagged.

``artifact_bytes`` is the artifact's weight files on disk, ``kv_bytes_measured`` the session's
allocated cache after prefilling a context; a stage whose measured and analytic figures differ by
more than 10 % is flagged in every output, and ``--strict`` fails the run on it.  Backend refusals
happen up front, in ``--dry-run``, naming the node and the attribute.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import pytest
from click.testing import CliRunner
from tiny_models import save_word_tokenizer

from tokopt.backends.artifact import weight_files
from tokopt.cli import cli
from tokopt.measure.agreement import disagreements
from tokopt.measure.gates import Gates, check_gates

needs_onnxruntime = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
SMALL = ["--eval-tokens", "2x32", "--calib-tokens", "2x32"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir("llama")[0]


def test_disagreements_flag_what_differs_by_more_than_ten_percent():
    metrics = {"weight_bytes": 1000, "artifact_bytes": 1090, "kv_bytes_at": {"512": 100.0, "2048": 400.0},
               "kv_bytes_measured": {"512": 100, "2048": 1600}}
    flagged = disagreements(metrics)
    assert [(f["metric"], f["context"]) for f in flagged] == [("kv_bytes", 2048)]
    assert flagged[0]["ratio"] == 4.0 and "1,600 B" in flagged[0]["message"]
    assert disagreements({**metrics, "artifact_bytes": 1200, "kv_bytes_measured": {}})[0]["metric"] == "artifact_bytes"


def test_strict_gate_fails_on_a_mismatch_and_passes_without():
    base = {"ppl": 10.0, "ppl_delta_pct": 0.0}
    mismatch = {"metric": "kv_bytes", "ratio": 4.0, "message": "quantize: kv_bytes at 2048 tokens: …"}
    (fail,) = check_gates(Gates(strict=True), base, base, [mismatch])
    assert not fail.passed and fail.gate == "--strict" and fail.value == pytest.approx(300.0)
    (ok,) = check_gates(Gates(strict=True), base, base, [])
    assert ok.passed
    assert check_gates(Gates(), base, base, [mismatch]) == []
    assert Gates().merged({"strict": True}).strict


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=needs_onnxruntime)])
def test_report_measures_the_artifact(tiny_dir, tmp_path, backend):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    save_word_tokenizer(model, json.loads((model / "config.json").read_text())["vocab_size"])
    (model / "chat_template.jinja").write_text("{{ messages }}")  # the tokenizer's, never weight bytes
    out = tmp_path / "out"
    result = invoke("optimize", model, "--passes", "", "--backend", backend, "-o", out, "--json", *SMALL)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    (stage,) = report["stages"]
    assert any(out.rglob("chat_template.jinja"))  # shipped with the tokenizer, not counted as weights
    weights = {"torch": ["weights.safetensors"], "onnxruntime": ["model.onnx", "model.onnx.data"]}[backend]
    on_disk = sum((out / f).stat().st_size for f in weights if (out / f).exists())  # what du says of them
    assert sorted(f.name for f in weight_files(out)) == sorted(f for f in weights if (out / f).exists())
    assert stage["metrics"]["artifact_bytes"] == on_disk > 0
    assert report["schema_version"] == 2 and isinstance(stage["mismatches"], list)
    table = (out / "report.md").read_text()
    assert "| artifact |" in table and "KV measured" in table


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=needs_onnxruntime)])
def test_the_reports_quality_is_the_artifacts_where_its_session_runs_here(tiny_dir, tmp_path, backend):
    """onnxruntime's int8 activations follow the IR only to float rounding, and a flipped rounding moves a
    whole model's logits: the report's perplexity is measured on the artifact, equal to ``tokopt eval`` of it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    save_word_tokenizer(model, json.loads((model / "config.json").read_text())["vocab_size"])
    out = tmp_path / "out"
    result = invoke("optimize", model, "--passes", "quantize:bits=4,method=rtn", "--backend", backend, "-o", out,
                    "--speed", "off", *SMALL)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    on = {"torch": "reference executor (the IR)", "onnxruntime": "onnxruntime artifact, in process"}[backend]
    assert report["quality_measured_on"] == report["stages"][-1]["quality_measured_on"] == on
    assert on in (out / "report.md").read_text()
    evaluated = invoke("eval", out, "--eval-tokens", "2x32", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ppl"] == pytest.approx(report["stages"][-1]["metrics"]["ppl"], rel=1e-6)


@needs_onnxruntime
def test_a_refused_attribute_fails_the_dry_run_in_seconds_naming_the_node(tiny_dir, tmp_path):
    started = time.perf_counter()
    result = invoke("optimize", tiny_dir, "--passes", "kv-layout:storage=paged,block_size=16", "--backend",
                    "onnxruntime", "-o", tmp_path / "o", "--dry-run")
    assert result.exit_code == 2
    assert "after 'kv-layout:" in result.stderr and "layers.0.attn: kv_cache.storage='paged'" in result.stderr
    assert "backends that can: torch" in result.stderr
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "o").exists()


def test_the_kv_is_measured_past_the_first_context_only_where_the_ir_bends_it(tiny_dir):
    """A linearly growing cache is measured at 512 tokens; a window, a static reservation, to 2,048 too."""
    import tokopt
    from tokopt.measure.speed import informative_kv_context
    from tokopt.optimizer.pass_api import PassContext
    from tokopt.passes.kv_layout import KVLayout
    from tokopt.passes.sparse_attention import SparseAttention

    graph = tokopt.load(str(tiny_dir))
    assert informative_kv_context(graph, 2048) == 512
    assert informative_kv_context(graph, 0) == 0 and informative_kv_context(graph, 100) == 100
    windowed = SparseAttention(window=256, sinks=4).run(graph, PassContext()).graph
    assert informative_kv_context(windowed, 2048) == 2048
    static = KVLayout(storage="static").run(graph, PassContext()).graph
    assert informative_kv_context(static, 2048) == 2048


@pytest.mark.parametrize("backend", [None, pytest.param("onnxruntime", marks=needs_onnxruntime)])
def test_bench_profile_says_where_a_decode_step_goes(tiny_dir, backend):
    """Per op kind, from the runtime's own profiler, summing to the profiled time, beside the bandwidth bound."""
    args = ["bench", tiny_dir, "--profile", "--decode-tokens", "4", "--json"] + (["--backend", backend] if backend
                                                                                   else [])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["steps"] == 4 and found["step_ms"] > 0 and found["bound_ms"] > 0
    assert ("onnxruntime" if backend else "torch") in found["instrument"]
    ops = [op["op"] for op in found["ops"]]
    assert ("MatMul" if backend else "aten::mm") in ops, ops  # the Linears
    if backend:  # onnxruntime's op kinds are few, all listed; torch's small ones trade places in its top 15
        assert "GroupQueryAttention" in ops, ops
    assert abs(sum(op["share"] for op in found["ops"]) + found["other_ops_share"] - 1) < 1e-6
    assert invoke("bench", tiny_dir, tiny_dir, "--profile").exit_code == 2
