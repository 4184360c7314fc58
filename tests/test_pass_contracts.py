"""Pass contracts are enforced, not trusted: modified, requires, ensures, moves, and an untouched input.

Every offending pass here is registered the way a third party would (through the plugin hooks),
so each failure must name both the pass and its plugin.
"""

from __future__ import annotations

import pytest

from tokopt.errors import PassContractError, PreconditionError
from tokopt.jobs.optimize import optimize
from tokopt.optimizer.ir.weights import materialize
from tokopt.optimizer.manager import fingerprint, run_pass
from tokopt.optimizer.pass_api import Pass, PassContext, PassResult
from tokopt.passes.pipeline import parse_passes, resolve
from tokopt.plugins import hookimpl, register_plugin, unregister_plugin

PLUGIN = "contract-breakers"


def _scaled_norms(graph):
    out = graph.copy()
    for node in out.nodes("RMSNorm"):
        out.params[node.params["weight"]] = materialize(out.params[node.params["weight"]]) * 0.5
    return out


class SilentChange(Pass):
    """Changes the numerics but reports modified=False (the report would copy the previous stage)."""

    name = "silent-change"

    def run(self, graph, ctx):
        return PassResult(_scaled_norms(graph), modified=False)


class InPlace(Pass):
    """Edits its input graph instead of a copy."""

    name = "in-place"

    def run(self, graph, ctx):
        node = graph.nodes("RMSNorm")[0]
        graph.params[node.params["weight"]] = materialize(graph.params[node.params["weight"]]) * 0.5
        return PassResult(graph, modified=True)


class BrokenPromise(Pass):
    """Declares that its output has sliding-window attention, and returns a graph without any."""

    name = "broken-promise"
    ensures = frozenset({"window"})

    def run(self, graph, ctx):
        return PassResult(_scaled_norms(graph), modified=True)


class Densify(Pass):
    """Declares that no mixture-of-experts layer is left (as a pass merging experts into one MLP would)."""

    name = "densify"
    ensures = frozenset({"!moe"})

    def run(self, graph, ctx):  # pragma: no cover - the dry run must stop before it runs
        raise AssertionError("a dry run runs no pass")


class BadMoves(Pass):
    """Promises to move a metric the report does not have."""

    name = "bad-moves"
    moves = ("ppl", "tokens_per_joule")

    def run(self, graph, ctx):
        return PassResult(graph, modified=False)


class FakeLayout(Pass):
    """Says it only changes layout (changes_numerics=False) but scales the norms."""

    name = "fake-layout"
    changes_numerics = False

    def run(self, graph, ctx):
        return PassResult(_scaled_norms(graph), modified=True)


class HonestNoOp(Pass):
    name = "honest-noop"

    def run(self, graph, ctx):
        return PassResult(graph, modified=False)


class Breakers:
    @hookimpl
    def tokopt_plugin_api_version(self):
        return 1

    @hookimpl
    def tokopt_register_passes(self):
        return {p.name: p for p in (SilentChange, InPlace, BrokenPromise, Densify, BadMoves, FakeLayout, HonestNoOp)}


@pytest.fixture(scope="module", autouse=True)
def breakers():
    register_plugin(Breakers(), PLUGIN)
    yield
    unregister_plugin(PLUGIN)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    import tokopt

    return tokopt.load(tiny_model_dir("llama")[0])


@pytest.fixture(scope="module")
def mixtral(tiny_model_dir):
    import tokopt

    return tokopt.load(tiny_model_dir("mixtral")[0])


def _run(spec: str, graph):
    (p,) = resolve(parse_passes(spec))
    return run_pass(p, graph, PassContext(), 1)


def test_modified_false_with_a_changed_graph_names_the_pass_and_plugin(llama):
    with pytest.raises(PassContractError, match=rf"'silent-change' \(plugin '{PLUGIN}'\).*modified=False"):
        _run("silent-change", llama)


def test_a_pass_that_edits_its_input_is_caught_and_the_input_reported(llama):
    before = fingerprint(llama)
    with pytest.raises(PassContractError, match=rf"'in-place' \(plugin '{PLUGIN}'\).*modified its input"):
        _run("in-place", llama.copy())
    assert fingerprint(llama) == before


def test_broken_ensures_names_the_pass_and_plugin(llama):
    with pytest.raises(PassContractError, match=rf"'broken-promise' \(plugin '{PLUGIN}'\).*sliding-window"):
        _run("broken-promise", llama)


def test_changes_numerics_false_is_checked_on_the_logits(llama):
    with pytest.raises(PassContractError, match=rf"'fake-layout' \(plugin '{PLUGIN}'\).*changes_numerics=False"):
        _run("fake-layout", llama)
    # a real layout pass passes the same check (paged storage decodes to the same logits)
    from tokopt.passes.kv_layout import KVLayout

    assert run_pass(KVLayout(storage="paged", block_size=4), llama, PassContext(), 1).changed


def test_an_honest_noop_is_recorded_as_unchanged(llama):
    stage = _run("honest-noop", llama)
    assert stage.changed is False and "no change" in stage.notes and fingerprint(stage.graph) == fingerprint(llama)


def test_requires_runs_on_what_the_earlier_pass_leaves_so_a_dry_run_fails(mixtral, tmp_path):
    with pytest.raises(PreconditionError, match=r"expert-prune.*mixture-of-experts.*after 'densify'"):
        optimize(mixtral, "densify,expert-prune:keep=3", backend="none", out=tmp_path / "o", dry_run=True)
    # the same pass alone is fine: the model has MoE layers
    optimize(mixtral, "expert-prune:keep=3", backend="none", out=tmp_path / "o", dry_run=True)


def test_moves_are_checked_against_the_report_metrics(llama, tmp_path):
    with pytest.raises(PassContractError, match=rf"'bad-moves' \(plugin '{PLUGIN}'\).*tokens_per_joule"):
        optimize(llama, "bad-moves", backend="none", out=tmp_path / "o", dry_run=True)


def test_every_builtin_pass_declares_only_real_metrics_and_conditions():
    from tokopt.jobs.optimize import check_moves
    from tokopt.optimizer.pass_api import parse_condition
    from tokopt.passes.registry import BUILTIN_PASSES, builtin_pass

    options = {"expert-prune": {"keep": 1}, "gqa": {"num_kv_heads": 1}, "kv-layout": {"storage": "static"}}
    passes = [builtin_pass(name)(**options.get(name, {})) for name in BUILTIN_PASSES]
    check_moves(passes)
    for p in passes:
        for cond in (*p.requires, *p.ensures):
            parse_condition(cond, p.spec())
