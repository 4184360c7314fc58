"""The pass manager: --passes syntax, recipes, up-front checks, failures naming the pass, atomic OUT.

Passes used here are real (they change the graph and the numbers move), registered the way
a third party would — through the plugin hooks — so crashes are attributed to a plugin.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokopt.errors import (
    GateError,
    OutputExistsError,
    PassOptionError,
    PluginError,
    PreconditionError,
    RecipeError,
    UsageError,
    VerificationError,
)
from tokopt.jobs.evaluate import evaluate
from tokopt.jobs.optimize import optimize
from tokopt.measure.gates import Gates
from tokopt.optimizer.ir.weights import materialize
from tokopt.optimizer.pass_api import Option, Pass, PassResult
from tokopt.optimizer.recipe import PassSpec, load_recipe
from tokopt.passes.pipeline import parse_passes, recipe_passes, resolve
from tokopt.plugins import hookimpl, register_plugin, unregister_plugin
from tokopt.report.document import LONG_METRIC_KEYS, STAGE_METRIC_KEYS

PLUGIN = "acme-tokopt-test"
SMALL_EVAL = {"sequences": 2, "seq_len": 32, "calib_sequences": 2, "calib_seq_len": 32, "long_context": 96,
              "long_sequences": 1}
SMALL_SPEED = {"prompt_len": 8, "decode_tokens": 4, "batch_size": 2}


class ScaleNorms(Pass):
    """Multiply every RMSNorm weight by ``factor``: a real change of the numerics, cheap to run."""

    name = "test-scale-norms"
    summary = "scale RMSNorm weights"
    options = (Option("factor", "float", 1.0, "multiplier of every RMSNorm weight"),
               Option("layers", "int_list", None, "unused; exercises ';' lists"))
    moves = ("ppl", "kl")

    def run(self, graph, ctx):
        graph = graph.copy()  # a pass never changes its input (the manager checks)
        factor = self.opts["factor"]
        norms = graph.nodes("RMSNorm")
        for node in norms:
            pname = node.params["weight"]
            graph.params[pname] = materialize(graph.params[pname]) * factor  # replace, never mutate
        return PassResult(graph, factor != 1.0, [f"scaled {len(norms)} norms by {factor}"])


class ScaleNormsLong(ScaleNorms):
    """The same, declaring that it moves long-context perplexity (so every stage measures it)."""

    name = "test-scale-norms-long"
    moves = ("ppl", "long_ppl")


class Crash(Pass):
    """A pass with a bug."""

    name = "test-crash"
    summary = "always crashes"

    def run(self, graph, ctx):
        return 1 / 0


class BreakGraph(Pass):
    """Drops a parameter a node still uses: the verifier must catch it."""

    name = "test-break"
    summary = "returns an invalid graph"

    def run(self, graph, ctx):
        graph = graph.copy()
        del graph.params[graph.nodes("RMSNorm")[0].params["weight"]]
        return PassResult(graph, True)


class NoOp(Pass):
    name = "test-noop"
    summary = "changes nothing"
    changes_numerics = False

    def run(self, graph, ctx):
        return PassResult(graph, False)


class AcmePlugin:
    @hookimpl
    def tokopt_plugin_api_version(self):
        return 1

    @hookimpl
    def tokopt_register_passes(self):
        return {p.name: p for p in (ScaleNorms, ScaleNormsLong, Crash, BreakGraph, NoOp)}


@pytest.fixture(scope="module", autouse=True)
def acme_plugin():
    register_plugin(AcmePlugin(), PLUGIN)
    yield PLUGIN
    unregister_plugin(PLUGIN)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import tokopt

    path, _ = tiny_model_dir("llama")
    return path, tokopt.load(path)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p == out)


# -- parsing ---------------------------------------------------------------------------------
def test_passes_syntax_splits_passes_and_options():
    known = {"quantize", "gqa", "kv-layout"}
    specs = parse_passes("quantize:bits=8,group_size=64,gqa:num_kv_heads=1", known)
    assert [(s.name, s.options) for s in specs] == [("quantize", {"bits": "8", "group_size": "64"}),
                                                   ("gqa", {"num_kv_heads": "1"})]
    specs = parse_passes(" kv-layout , quantize:include=a.*;b.*, exclude=lm_head", known)
    assert [(s.name, s.options) for s in specs] == [("kv-layout", {}),
                                                   ("quantize", {"include": "a.*;b.*", "exclude": "lm_head"})]
    assert parse_passes("", known) == [] and parse_passes(None, known) == []
    assert parse_passes("unknown-plugin-pass:x=1", known)[0].name == "unknown-plugin-pass"  # resolved later


@pytest.mark.parametrize("text, message", [
    ("bits=8", "comes before any pass"),
    ("quantize:bits=8,frobnicate", "neither a known pass nor key=value"),
    ("quantize:bits=8,bits=4", "given twice"),
    (":bits=8", "no pass name"),
])
def test_passes_syntax_errors_are_usage_errors(text, message):
    with pytest.raises(RecipeError, match=message) as info:
        parse_passes(text, {"quantize"})
    assert info.value.exit_code == 2


def test_yaml_and_toml_recipes_mean_the_same(tmp_path):
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("passes:\n  - test-scale-norms: {factor: 0.5, layers: [1, 2]}\n"
                         "  - name: test-noop\n  - 'test-scale-norms:factor=2'\ngates:\n  max_kl: 0.1\n")
    toml_file = tmp_path / "r.toml"
    toml_file.write_text('[[passes]]\nname = "test-scale-norms"\noptions = { factor = 0.5, layers = [1, 2] }\n'
                         '[[passes]]\nname = "test-noop"\n[[passes]]\nname = "test-scale-norms"\n'
                         'options = { factor = "2" }\n[gates]\nmax_kl = 0.1\n')
    a, b = (resolve(recipe_passes(load_recipe(f)["passes"])) for f in (yaml_file, toml_file))
    assert [(p.name, p.opts) for p in a] == [(p.name, p.opts) for p in b]
    assert [p.spec() for p in a] == ["test-scale-norms:factor=0.5,layers=1;2", "test-noop",
                                     "test-scale-norms:factor=2.0"]
    assert all(p.plugin == PLUGIN for p in a)
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: []\nfrobs: 1\n")
    with pytest.raises(RecipeError, match="unknown key.*frobs.*valid keys"):
        load_recipe(bad)


def test_bad_option_lists_the_valid_ones():
    with pytest.raises(PassOptionError) as info:
        resolve([PassSpec("test-scale-norms", {"facter": "2"})])
    assert "facter" in str(info.value) and "valid options: factor: float" in str(info.value)
    with pytest.raises(PassOptionError, match="bad value for factor"):
        resolve([PassSpec("test-scale-norms", {"factor": "lots"})])
    with pytest.raises(PassOptionError, match="unknown pass 'no-such-pass'"):
        resolve([PassSpec("no-such-pass")])


# -- up-front checks --------------------------------------------------------------------------
def test_dry_run_checks_everything_and_writes_nothing(tiny, tmp_path):
    path, graph = tiny
    out = tmp_path / "out"
    result = optimize(graph, "test-scale-norms:factor=0.5", out=out, dry_run=True, eval_options=SMALL_EVAL)
    assert result.report is None and not out.exists()
    assert result.plan["recipe"]["passes"][0] == {
        "name": "test-scale-norms", "options": {"factor": 0.5, "layers": None}, "plugin": PLUGIN,
        "spec": "test-scale-norms:factor=0.5"}
    # a precondition fails before any evaluation: expert pruning needs MoE layers
    with pytest.raises(PreconditionError, match="expert-prune.*mixture-of-experts"):
        optimize(graph, "test-noop,expert-prune:keep=1", out=out, dry_run=True, eval_options=SMALL_EVAL)
    with pytest.raises(UsageError, match="given twice"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text("passes: [test-noop]\n")
        optimize(graph, "test-noop", recipe=recipe, out=out, dry_run=True)


# -- running ----------------------------------------------------------------------------------
def test_pipeline_report_rows_follow_from_the_ir(tiny, tmp_path):
    from tokopt.optimizer.ir.cost import kv_bytes_for_context, static_metrics

    path, graph = tiny
    out = tmp_path / "out"
    result = optimize(graph, "test-scale-norms:factor=0.9,test-noop", backend="torch", out=out,
                      eval_options=SMALL_EVAL, speed_options=SMALL_SPEED)
    report = json.loads((out / "report.json").read_text())
    assert result.passed and result.out == out.resolve()
    assert {"report.json", "report.md", "report.html", "recipe.yaml", "tokopt_artifact.json"} <= {
        p.name for p in out.iterdir()}
    assert [s["name"] for s in report["stages"]] == ["baseline", "test-scale-norms:factor=0.9", "test-noop"]
    for stage in report["stages"]:
        assert tuple(stage["metrics"]) == STAGE_METRIC_KEYS
    base, scaled, noop = (s["metrics"] for s in report["stages"])
    static = static_metrics(graph)
    assert base["weight_bytes"] == static.weight_bytes == 4 * base["params"]
    assert base["kv_bytes_per_token"] == sum(2 * n.attrs["num_kv_heads"] * n.attrs["head_dim"] * 4
                                             for n in graph.nodes("Attention"))
    assert base["kv_bytes_at"]["2048"] == kv_bytes_for_context(graph, 2048) == 2048 * base["kv_bytes_per_token"]
    assert base["decode_tok_s_bound"] == pytest.approx(
        report["machine"]["memory_bandwidth_bytes_per_s"] / static.bytes_per_token)
    assert (base["ppl_delta_pct"], base["kl"], base["top1_agreement"]) == (0.0, 0.0, 1.0)
    assert scaled["kl"] > 0 and scaled["ppl"] != base["ppl"]
    assert noop == scaled  # an unchanged stage carries the previous measurements
    assert report["stages"][2]["changed"] is False and "no change" in report["stages"][2]["notes"]
    assert report["recipe"]["passes"][0]["plugin"] == PLUGIN
    assert report["artifact"]["parity"]["passed"] is True
    for stage in report["stages"]:  # speed: each stage's torch artifact, loaded in a fresh process
        assert stage["speed"]["measured_on"] == "torch artifact, fresh process"
        assert stage["metrics"]["decode_tok_s"] > 0 and stage["metrics"]["prefill_tok_s"] > 0
        assert stage["speed"]["decode_tok_s_batch"] > 0 and stage["speed"]["batch_size"] == 2
        assert stage["metrics"]["peak_rss_bytes"] > 10 * 2**20
    # the artifact in OUT evaluates to the final stage's perplexity
    assert evaluate(out, eval_options=SMALL_EVAL)["ppl"] == pytest.approx(noop["ppl"], rel=1e-6)
    assert evaluate(graph, eval_options=SMALL_EVAL)["ppl"] == base["ppl"]


def test_long_context_ppl_is_measured_for_every_stage_when_a_pass_moves_it(tiny, tmp_path):
    _, graph = tiny
    result = optimize(graph, "test-scale-norms-long:factor=0.8", backend="none", out=tmp_path / "o", speed="off",
                      eval_options=SMALL_EVAL)
    rows = [s["metrics"] for s in result.report["stages"]]
    assert all(tuple(r) == STAGE_METRIC_KEYS + LONG_METRIC_KEYS for r in rows)
    assert rows[0]["long_ppl_delta_pct"] == 0.0 and rows[1]["long_ppl"] != rows[0]["long_ppl"]
    assert result.report["eval"]["long_context"] == SMALL_EVAL["long_context"]


def test_crash_in_a_plugin_pass_names_pass_and_plugin_and_leaves_nothing(tiny, tmp_path):
    _, graph = tiny
    out = tmp_path / "out"
    with pytest.raises(PluginError) as info:
        optimize(graph, "test-noop,test-crash", backend="none", out=out, speed="off", eval_options=SMALL_EVAL)
    assert "test-crash" in str(info.value) and PLUGIN in str(info.value) and "ZeroDivisionError" in str(info.value)
    assert info.value.exit_code == 5
    assert _leftovers(out) == []


def test_invalid_graph_from_a_pass_is_caught_and_named(tiny, tmp_path):
    _, graph = tiny
    out = tmp_path / "out"
    with pytest.raises(VerificationError) as info:
        optimize(graph, "test-break", backend="none", out=out, speed="off", eval_options=SMALL_EVAL)
    assert "test-break" in str(info.value) and PLUGIN in str(info.value) and info.value.exit_code == 3
    assert _leftovers(out) == []


def test_failed_gate_says_which_and_by_how_much_and_writes_nothing(tiny, tmp_path):
    _, graph = tiny
    out = tmp_path / "out"
    result = optimize(graph, "test-scale-norms:factor=0.5", backend="none", out=out, speed="off",
                      eval_options=SMALL_EVAL, gates=Gates(max_kl=1e-6, max_ppl_increase=1e6))
    assert not result.passed and result.out is None and _leftovers(out) == []
    error = result.gate_error()
    assert isinstance(error, GateError) and error.exit_code == 1
    assert "--max-kl" in str(error) and "over by" in str(error) and "--max-ppl-increase" not in str(error)
    verdicts = {g["gate"]: g["passed"] for g in result.report["gates"]}
    assert verdicts == {"--max-kl": False, "--max-ppl-increase": True}


def test_existing_out_is_refused_unless_forced(tiny, tmp_path):
    _, graph = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        optimize(graph, "", backend="none", out=out, speed="off", eval_options=SMALL_EVAL)
    assert (out / "keep.txt").exists()
    optimize(graph, "", backend="none", out=out, speed="off", eval_options=SMALL_EVAL, force=True)
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()
    assert _leftovers(out) == ["out"]


def test_pipeline_object_runs_passes_on_a_copy(tiny):
    import torch

    from tokopt import Pipeline

    _, graph = tiny
    pipeline = Pipeline.parse("test-scale-norms:factor=0.5,test-noop")
    assert pipeline.specs() == ["test-scale-norms:factor=0.5", "test-noop"]
    new = pipeline.run(graph)
    name = graph.nodes("RMSNorm")[0].params["weight"]
    assert torch.equal(materialize(new.params[name]), 0.5 * materialize(graph.params[name]))
    assert new.history[-2:] == ["test-scale-norms:factor=0.5", "test-noop"] and graph.history[-1] != "test-noop"
