"""Every exit code documented at the top of ``tokopt/cli.py`` is reached through the command line.

One check per code, each invoking the ``tokopt`` command (click's runner calls ``cli.main``, the
same :class:`~tokopt.cli.TokoptGroup` that maps errors to codes; 130 and 143 need a real process
and a real signal, so they run in ``tests/test_interrupts.py``).  The failures come from a tiny
in-process plugin: a pass that returns an invalid graph (3), a pass that crashes (5), and a backend
whose artifact answers with shifted logits (4, the parity check refuses it).  Each failure ends in
one ``error:`` line and leaves nothing at OUT.

:data:`CHECKS` maps each code to the test that reaches it; ``test_every_documented_code_is_checked``
keeps that map and the docstring of ``tokopt/cli.py`` in step.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import tokopt.cli
from tokopt.backends.torch.backend import TorchBackend
from tokopt.cli import cli
from tokopt.optimizer.manager import Pass, PassContext, PassResult
from tokopt.plugins import hookimpl, register_plugin, unregister_plugin

PLUGIN = "exit-codes-test"

#: exit code -> (test module, test function) that reaches it through the CLI.
CHECKS: dict[int, tuple[str, str]] = {
    0: ("test_exit_codes", "test_exit_0_success_writes_out"),
    1: ("test_exit_codes", "test_exit_1_failed_gate"),
    2: ("test_exit_codes", "test_exit_2_user_error"),
    3: ("test_exit_codes", "test_exit_3_invalid_graph_from_a_pass"),
    4: ("test_exit_codes", "test_exit_4_artifact_disagrees_with_the_reference"),
    5: ("test_exit_codes", "test_exit_5_plugin_crash"),
    70: ("test_exit_codes", "test_exit_70_internal_error"),
    130: ("test_interrupts", "test_interrupt_exits_in_one_line_and_leaves_nothing"),  # SIGINT cases
    143: ("test_interrupts", "test_interrupt_exits_in_one_line_and_leaves_nothing"),  # sigterm-speed-child
}


class BreakGraph(Pass):
    """Drops a parameter a node still reads: the verifier after the pass must catch it."""

    name = "exit3-break"
    summary = "returns an invalid graph"

    def run(self, graph, ctx: PassContext) -> PassResult:
        graph = graph.copy()
        del graph.params[graph.nodes("RMSNorm")[0].params["weight"]]
        return PassResult(graph, True)


class Crash(Pass):
    name = "exit5-crash"
    summary = "raises inside run"

    def run(self, graph, ctx: PassContext) -> PassResult:
        raise ZeroDivisionError("exit-5 check")


class _Skewed:
    """A session whose logits are the reference's shifted by one token: top-1 never agrees."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def forward(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        return torch.roll(self._inner.forward(tokens, cache), 1, dims=-1)


class SkewedBackend(TorchBackend):
    """The torch artifact, loaded as a session that disagrees with the reference executor."""

    name = "exit4-skewed"
    summary = "torch artifact with shifted logits"

    def load(self, path: Path, **options: Any) -> Any:
        from tokopt.optimizer.interpret.reference import ReferenceExecutor
        from tokopt.optimizer.ir.serialize import load_graph

        return _Skewed(ReferenceExecutor(load_graph(Path(path))))


class ExitCodePlugin:
    @hookimpl
    def tokopt_plugin_api_version(self):
        return 1

    @hookimpl
    def tokopt_register_passes(self):
        return {p.name: p for p in (BreakGraph, Crash)}

    @hookimpl
    def tokopt_register_backends(self):
        return {SkewedBackend.name: SkewedBackend}


@pytest.fixture(scope="module", autouse=True)
def exit_code_plugin():
    register_plugin(ExitCodePlugin(), PLUGIN)
    yield
    unregister_plugin(PLUGIN)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama")[0])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("exit_codes") / "small.yaml"
    path.write_text("eval: {sequences: 2, seq_len: 16, calib_sequences: 2, calib_seq_len: 16}\n")
    return str(path)


def optimize(model: str, recipe: str, out: Path, *args: str):
    return CliRunner().invoke(cli, ["optimize", model, "--recipe", recipe, "--speed", "off", "-o", str(out), *args])


def _one_error_line(result) -> str:
    """The stderr's only ``error:`` line, which is its last, with no traceback."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], result.stderr
    return lines[-1]


def _nothing_at(out: Path) -> bool:
    return not any(p.name == out.name or p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def test_every_documented_code_is_checked():
    documented = {int(code) for code in re.findall(r"^- (\d+)(?: / (\d+))?:", tokopt.cli.__doc__, re.M)
                  for code in code if code}
    assert documented == set(CHECKS), f"documented {sorted(documented)}, checked {sorted(CHECKS)}"
    for code, (module, test) in CHECKS.items():
        source = (Path(__file__).parent / f"{module}.py").read_text()
        assert f"def {test}(" in source, f"exit {code}: {module}.{test} does not exist"
    interrupts = (Path(__file__).parent / "test_interrupts.py").read_text()
    assert "signal.SIGINT" in interrupts and "signal.SIGTERM" in interrupts and "128 + sig" in interrupts


def test_exit_0_success_writes_out(model, recipe, tmp_path):
    out = tmp_path / "out"
    result = optimize(model, recipe, out, "--passes", "quantize:bits=8", "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert (out / "report.json").is_file() and (out / "tokopt_artifact.json").is_file()


def test_exit_1_failed_gate(model, recipe, tmp_path):
    out = tmp_path / "out"
    result = optimize(model, recipe, out, "--passes", "quantize:bits=4", "--backend", "none", "--max-kl", "1e-12")
    assert result.exit_code == 1, result.output
    assert _one_error_line(result).startswith("error: gate failed: --max-kl") and _nothing_at(out)


def test_exit_2_user_error(model, recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = optimize(model, recipe, out, "--passes", "", "--backend", "none")
    assert result.exit_code == 2, result.output
    assert "--force" in _one_error_line(result) and not any(out.iterdir())
    result = optimize(model, recipe, tmp_path / "other", "--passes", "no-such-pass")
    assert result.exit_code == 2 and "no-such-pass" in _one_error_line(result) and _nothing_at(tmp_path / "other")


def test_exit_3_invalid_graph_from_a_pass(model, recipe, tmp_path):
    out = tmp_path / "out"
    result = optimize(model, recipe, out, "--passes", "exit3-break", "--backend", "none")
    assert result.exit_code == 3, result.output
    assert "exit3-break" in _one_error_line(result) and _nothing_at(out)


def test_exit_4_artifact_disagrees_with_the_reference(model, recipe, tmp_path):
    out = tmp_path / "out"
    result = optimize(model, recipe, out, "--passes", "", "--backend", SkewedBackend.name)
    assert result.exit_code == 4, result.output
    line = _one_error_line(result)
    assert "disagrees with the reference executor" in line and "not written" in line and _nothing_at(out)


def test_exit_5_plugin_crash(model, recipe, tmp_path):
    out = tmp_path / "out"
    result = optimize(model, recipe, out, "--passes", "exit5-crash", "--backend", "none")
    assert result.exit_code == 5, result.output
    line = _one_error_line(result)
    assert "'exit5-crash'" in line and PLUGIN in line and "ZeroDivisionError" in line and _nothing_at(out)


def test_exit_70_internal_error(model, recipe, tmp_path, monkeypatch):
    """A bug inside tokopt itself (here: the report writer raising) is 70, not 1 like a failed gate: the
    traceback for the bug report, then one ``error:`` line, and nothing at OUT."""
    import tokopt.jobs.optimize

    def broken(*args: Any, **kwargs: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'stages'")

    monkeypatch.setattr(tokopt.jobs.optimize, "write_reports", broken)
    out = tmp_path / "out"
    result = optimize(model, recipe, out, "--passes", "", "--backend", "none")
    assert result.exit_code == 70, result.output
    lines = result.stderr.strip().splitlines()
    assert "Traceback" in result.stderr and lines[-1].startswith("error: internal error (AttributeError")
    assert "bug in tokopt" in lines[-1] and _nothing_at(out)
