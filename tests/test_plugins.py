"""The plugin system: discovery through entry points (lazy), registration, failures named, observers, ops.

Plugins are real: in-process objects registered with the manager, and temporary
*distributions* (a ``*.dist-info`` with an ``entry_points.txt`` on ``sys.path``) discovered
through ``importlib.metadata`` in a subprocess — exactly what ``pip install`` produces.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import types
import typing
from pathlib import Path

import pytest
import torch

import tokopt
from tokopt import plugins
from tokopt.errors import BackendRefusalError, PassOptionError, PluginError, PreconditionError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.pass_api import Option, Pass, PassContext, PassResult
from tokopt.plugins import hookimpl, hookspecs

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import sample_ids, save_tiny_llama  # noqa: E402


@pytest.fixture
def manager():
    """A manager that sees no installed entry points (so installed plugins do not interfere)."""
    saved = plugins._MANAGER
    mgr = plugins.reset_plugin_manager(discover=False)
    yield mgr
    plugins._MANAGER = saved


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory) -> Graph:
    return tokopt.load(str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", layers=2)))


class ScaleLogits(Pass):
    """Multiplies the LM head weight by a factor (a toy pass with an observable effect)."""

    name = "scale-logits"
    summary = "toy pass"
    options = (Option("factor", "float", 2.0, "multiplier"),)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        out = graph.copy()
        head = out.producer(out.outputs["logits"])
        pname = head.params["weight"]
        from tokopt.optimizer.ir.weights import materialize

        out.params[pname] = materialize(out.params[pname]) * self.opts["factor"]
        return PassResult(out, True, [f"scaled by {self.opts['factor']}"])


class CrashingPass(Pass):
    name = "crashing-pass"
    summary = "raises inside run"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise RuntimeError("boom inside the plugin")


def _plugin(**hooks) -> types.SimpleNamespace:
    """A plugin object: ``hooks`` are functions named after the hooks, marked as implementations."""
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


# -- the manual ------------------------------------------------------------------------------------
def test_every_hook_is_documented_and_typed():
    hooks = [f for n, f in vars(hookspecs).items() if n.startswith("tokopt_") and inspect.isfunction(f)]
    assert {f.__name__ for f in hooks} >= {
        "tokopt_plugin_api_version", "tokopt_register_passes", "tokopt_register_backends",
        "tokopt_register_frontends", "tokopt_register_ops", "tokopt_pipeline_start", "tokopt_stage_start",
        "tokopt_stage_end", "tokopt_pipeline_end"}
    for fn in hooks:
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 80, fn.__name__
        hints = typing.get_type_hints(fn, globalns={**vars(hookspecs), **_hint_namespace()})
        assert "return" in hints, fn.__name__
        assert set(inspect.signature(fn).parameters) <= set(hints), fn.__name__
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in doc, f"{fn.__name__} does not document {param}"


def _hint_namespace() -> dict:
    from tokopt.backends.base import Backend
    from tokopt.frontends.hf import Builder
    from tokopt.plugins.ops import OpDefinition

    return {"Backend": Backend, "Builder": Builder, "Graph": Graph, "Pass": Pass, "OpDefinition": OpDefinition}


# -- registration and resolution -------------------------------------------------------------------------
def test_in_process_plugin_pass_is_listed_resolved_and_named(manager, tiny_graph):
    from tokopt.passes.registry import get_pass_class, known_pass_names

    plugins.register_plugin(_plugin(tokopt_plugin_api_version=lambda: 1,
                                    tokopt_register_passes=lambda: {"scale-logits": ScaleLogits}), "toy-plugin")
    assert "scale-logits" in known_pass_names()
    cls = get_pass_class("scale-logits")
    assert cls is ScaleLogits and cls.plugin == "toy-plugin"
    assert cls.describe()["plugin"] == "toy-plugin"
    result = cls(factor=3).run(tiny_graph, PassContext())
    from tokopt.optimizer.interpret import ReferenceExecutor

    ids = sample_ids(1, 8)
    base = ReferenceExecutor(tiny_graph).forward(ids)
    torch.testing.assert_close(ReferenceExecutor(result.graph).forward(ids), base * 3, rtol=1e-5, atol=1e-5)


def test_unknown_pass_lists_plugin_passes_too(manager):
    from tokopt.passes.registry import get_pass_class

    plugins.register_plugin(_plugin(tokopt_register_passes=lambda: {"scale-logits": ScaleLogits}), "toy-plugin")
    with pytest.raises(PassOptionError, match="scale-logits"):
        get_pass_class("no-such-pass")


def test_references_are_imported_only_when_the_name_is_used(manager, tmp_path, monkeypatch):
    from tokopt.passes.registry import get_pass_class, known_pass_names

    (tmp_path / "lazy_pass_mod.py").write_text(textwrap.dedent('''
        from tokopt.optimizer.pass_api import Pass, PassResult

        class LazyPass(Pass):
            name = "lazy-pass"
            summary = "imported on demand"

            def run(self, graph, ctx):
                return PassResult(graph, False)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.register_plugin(_plugin(tokopt_register_passes=lambda: {"lazy-pass": "lazy_pass_mod:LazyPass"}), "lazy")
    assert "lazy-pass" in known_pass_names()
    assert "lazy_pass_mod" not in sys.modules
    cls = get_pass_class("lazy-pass")
    assert "lazy_pass_mod" in sys.modules and cls.plugin == "lazy"
    sys.modules.pop("lazy_pass_mod", None)


def test_bad_reference_names_the_plugin(manager):
    from tokopt.passes.registry import get_pass_class

    plugins.register_plugin(_plugin(tokopt_register_passes=lambda: {"ghost": "no_such_module_xyz:Ghost"}), "ghostly")
    with pytest.raises(PluginError, match="ghostly.*no_such_module_xyz"):
        get_pass_class("ghost")


def test_class_name_must_match_registered_name(manager):
    from tokopt.passes.registry import get_pass_class

    plugins.register_plugin(_plugin(tokopt_register_passes=lambda: {"other-name": ScaleLogits}), "liar")
    with pytest.raises(PluginError, match="liar.*scale-logits"):
        get_pass_class("other-name")


def test_incompatible_api_version_is_refused_by_name(manager):
    with pytest.raises(PluginError, match="'from-the-future'.*API version 99"):
        plugins.register_plugin(_plugin(tokopt_plugin_api_version=lambda: 99), "from-the-future")
    assert "from-the-future" not in manager.plugins
    plugins.register_plugin(_plugin(tokopt_plugin_api_version=lambda: [1, 2]), "speaks-two")  # a list works


def test_unknown_hook_name_is_refused(manager):
    with pytest.raises(PluginError, match="typo-plugin"):
        plugins.register_plugin(_plugin(tokopt_register_pases=lambda: {}), "typo-plugin")


def test_crash_in_registration_hook_sets_the_plugin_aside_and_is_named(manager):
    from tokopt.passes.registry import get_pass_class, known_pass_names

    def broken() -> dict:
        raise ValueError("registration exploded")

    plugins.register_plugin(_plugin(tokopt_register_passes=broken), "exploding")
    plugins.register_plugin(_plugin(tokopt_register_passes=lambda: {"scale-logits": ScaleLogits}), "healthy")
    assert "scale-logits" in known_pass_names()  # one broken plugin does not take the others down
    assert "exploding" in plugins.plugin_failures()
    with pytest.raises(PluginError, match="exploding.*registration exploded") as err:
        get_pass_class("whatever-it-provided")
    assert err.value.exit_code == 5


def test_plugin_cannot_replace_a_builtin(manager):
    from tokopt.backends.registry import get_backend

    plugins.register_plugin(_plugin(tokopt_register_backends=lambda: {"torch": object}), "usurper")
    assert get_backend("torch").plugin == "tokopt"
    assert "built into tokopt" in plugins.plugin_failures()["usurper"]


def test_two_plugins_claiming_one_name_are_both_named(manager):
    plugins.register_plugin(_plugin(tokopt_register_passes=lambda: {"scale-logits": ScaleLogits}), "first")
    plugins.register_plugin(_plugin(tokopt_register_passes=lambda: {"scale-logits": ScaleLogits}), "second")
    assert plugins.plugin_names("pass") == ["scale-logits"]
    assert "'first'" in plugins.plugin_failures()["second"]


def test_crash_inside_a_plugin_pass_is_named_but_user_errors_pass_through(manager, tiny_graph):
    from tokopt.passes.registry import get_pass_class

    plugins.register_plugin(_plugin(tokopt_register_passes=lambda: {"crashing-pass": CrashingPass}), "crashy")
    p = get_pass_class("crashing-pass")()
    with pytest.raises(PluginError, match="'crashy'.*boom inside the plugin") as err:
        with plugins.plugin_guard(p.plugin, f"pass {p.name!r}"):
            p.run(tiny_graph, PassContext())
    assert err.value.plugin == "crashy" and isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(PreconditionError):  # deliberate user-facing errors are not rewrapped
        with plugins.plugin_guard("crashy", "check"):
            raise PreconditionError("needs MoE")
    with pytest.raises(RuntimeError):  # tokopt's own bugs keep their traceback
        with plugins.plugin_guard("tokopt", "builtin"):
            raise RuntimeError("a tokopt bug")


def test_crash_inside_a_plugin_pass_through_the_pipeline_names_the_plugin(manager, tiny_graph):
    pipeline = pytest.importorskip("tokopt.optimizer.manager")
    plugins.register_plugin(_plugin(tokopt_register_passes=lambda: {"crashing-pass": CrashingPass}), "crashy")
    from tokopt.passes.registry import get_pass_class

    with pytest.raises(PluginError, match="crashy"):
        pipeline.run_pass(get_pass_class("crashing-pass")(), tiny_graph, PassContext(), 1)


def test_plugin_backend_methods_name_the_plugin_when_they_crash(manager, tiny_graph, tmp_path):
    from tokopt.backends.base import Backend
    from tokopt.backends.registry import get_backend, known_backend_names

    class Fragile(Backend):
        name = "fragile"

        def lower(self, graph, out_dir):
            raise OSError("disk on fire")

    plugins.register_plugin(_plugin(tokopt_register_backends=lambda: {"fragile": Fragile}), "fragile-backend")
    assert "fragile" in known_backend_names()
    backend = get_backend("fragile")
    assert isinstance(backend, Fragile) and backend.plugin == "fragile-backend"
    assert backend.describe()["plugin"] == "fragile-backend"
    with pytest.raises(PluginError, match="'fragile-backend'.*lower.*disk on fire"):
        backend.lower(tiny_graph, tmp_path / "out")


# -- observers ----------------------------------------------------------------------------------------------
def test_observers_receive_events_in_order(manager, tiny_graph):
    events: list[tuple] = []
    plugins.register_plugin(_plugin(
        tokopt_pipeline_start=lambda model, passes, backend, graph: events.append(("start", model, tuple(passes))),
        tokopt_stage_start=lambda stage, index: events.append(("stage", stage, index)),  # a subset of args is fine
        tokopt_stage_end=lambda stage, index, metrics, notes: events.append(("end", stage, metrics["ppl"], notes)),
        tokopt_pipeline_end=lambda report, out_dir, error: events.append(("done", report["ok"], error)),
    ), "watcher")
    plugins.notify_pipeline_start("tiny", ["scale-logits:factor=3"], "torch", tiny_graph)
    plugins.notify_stage_start("baseline", 0, tiny_graph)
    plugins.notify_stage_end("baseline", 0, tiny_graph, {"ppl": 12.5}, [])
    plugins.notify_pipeline_end({"ok": True}, None, None)
    assert events == [("start", "tiny", ("scale-logits:factor=3",)), ("stage", "baseline", 0),
                      ("end", "baseline", 12.5, []), ("done", True, None)]


def test_crashing_observer_is_named(manager, tiny_graph):
    def bad(stage, index):
        raise KeyError("observer bug")

    plugins.register_plugin(_plugin(tokopt_stage_start=bad), "noisy-observer")
    with pytest.raises(PluginError, match="'noisy-observer'.*tokopt_stage_start"):
        plugins.notify_stage_start("baseline", 0, tiny_graph)


def test_pipeline_notifies_observers(manager, tiny_graph):
    pipeline = pytest.importorskip("tokopt.passes.pipeline")
    seen: list[str] = []
    plugins.register_plugin(_plugin(tokopt_stage_end=lambda stage, index: seen.append(f"{index}:{stage}")), "w")
    pipeline.Pipeline([ScaleLogits(factor=2.0)]).run(tiny_graph, PassContext())
    assert seen == ["0:baseline", "1:scale-logits"]


# -- ops ------------------------------------------------------------------------------------------------
def _scale_op_definition():
    from tokopt.optimizer.ir.ops import OpSpec
    from tokopt.plugins.ops import OpDefinition

    def kernel(node, ins, ctx):
        return ins[0] * node.attrs["factor"]

    spec = OpSpec("PluginScale", ("x",), ("out",), {"factor": 1.0}, (), lambda n, ins, g: [ins[0]],
                  lambda n, g, c=0: n.outputs[0].shape[-1], "x * factor (a plugin op)")
    return OpDefinition(spec, kernel, lowerings={"onnxruntime": "emit-mul"})


OP_DEFINITION = None  # filled lazily by the "module:attribute" reference test below


def test_plugin_op_is_installed_with_kernel_lowering_and_survives_serialization(manager, tiny_graph, tmp_path):
    from tokopt.optimizer.interpret import ReferenceExecutor
    from tokopt.optimizer.ir.ops import all_ops
    from tokopt.optimizer.ir.serialize import load_graph, save_graph
    from tokopt.optimizer.ir.verify import verify

    global OP_DEFINITION
    if "PluginScale" not in all_ops():
        OP_DEFINITION = _scale_op_definition()
    plugins.register_plugin(_plugin(tokopt_register_ops=lambda: [f"{__name__}:OP_DEFINITION"]), "op-plugin")
    plugins.install_plugin_ops()
    assert "PluginScale" in all_ops()
    assert plugins.op_lowering("onnxruntime", "PluginScale") == "emit-mul"

    g = tiny_graph.copy()
    old = g.outputs["logits"]
    g.outputs["logits"] = g.add_node("PluginScale", "scaled_logits", [old], {"factor": 0.5})
    verify(g, "test")
    ids = sample_ids(1, 6)
    torch.testing.assert_close(ReferenceExecutor(g).forward(ids), ReferenceExecutor(tiny_graph).forward(ids) * 0.5)
    save_graph(g, tmp_path / "g")
    torch.testing.assert_close(ReferenceExecutor(load_graph(tmp_path / "g")).forward(ids),
                               ReferenceExecutor(g).forward(ids), rtol=0, atol=0)


def _install_doubling_op(op: str, plugin: str, lowerings: dict) -> None:
    """Plugin ``plugin`` declares ``op`` (x * 2) with ``lowerings``.

    Ops are declared process-wide, once, so every test declares its own op name.
    """
    from tokopt.optimizer.ir.ops import OpSpec
    from tokopt.plugins.ops import OpDefinition

    spec = OpSpec(op, ("x",), ("out",), {}, (), lambda n, ins, g: [ins[0]], lambda n, g, c=0: 0, "x * 2 (a test op)")
    definition = OpDefinition(spec, lambda node, ins, ctx: ins[0] * 2, lowerings)
    plugins.register_plugin(_plugin(tokopt_register_ops=lambda: [definition]), plugin)
    plugins.install_plugin_ops()


def _with_op_on_logits(graph: Graph, op: str) -> Graph:
    g = graph.copy()
    g.outputs["logits"] = g.add_node(op, "plugin_op", [g.outputs["logits"]])
    return g


def test_onnxruntime_lowers_a_plugin_op_with_the_plugins_lowering(manager, tiny_graph, tmp_path):
    pytest.importorskip("onnxruntime")
    from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend

    def lower_double(ctx, node, inputs):
        return ctx.b.op("Add", [inputs[0], inputs[0]], name=node.name)

    _install_doubling_op("PluginDouble", "doubling-plugin", {"onnxruntime": lower_double})
    graph = _with_op_on_logits(tiny_graph, "PluginDouble")
    backend = OnnxRuntimeBackend()
    artifact = backend.lower(graph, tmp_path / "ort", parity_tokens=sample_ids(1, 6))  # refused unless in parity
    assert artifact.extra["parity"]["passed"]
    ids = sample_ids(1, 6)
    torch.testing.assert_close(backend.load(tmp_path / "ort").forward(ids),
                               ReferenceExecutor(tiny_graph).forward(ids) * 2, rtol=1e-4, atol=1e-4)


def test_backends_refuse_a_plugin_op_without_an_onnx_lowering_by_name(manager, tiny_graph):
    pytest.importorskip("onnxruntime")
    from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend
    from tokopt.backends.tensorrt.backend import TensorRTBackend

    _install_doubling_op("PluginUnlowered", "kernel-only-plugin", {})
    graph = _with_op_on_logits(tiny_graph, "PluginUnlowered")
    for backend in (OnnxRuntimeBackend(), TensorRTBackend()):
        with pytest.raises(BackendRefusalError, match="'PluginUnlowered' of plugin 'kernel-only-plugin'"):
            backend.check(graph)


@pytest.mark.parametrize("index, lowering, why", [
    (0, lambda ctx, node, inputs: {}["a bug in the lowering"], "KeyError"),
    (1, lambda ctx, node, inputs: [], r"returned \[\], not 1 ONNX tensor name"),
], ids=["crashes", "misanswers"])
def test_a_broken_plugin_lowering_names_the_plugin(manager, tiny_graph, index, lowering, why):
    pytest.importorskip("onnxruntime")
    from tokopt.backends.onnxruntime.lower import lower_graph

    _install_doubling_op(f"PluginBroken{index}", "broken-lowering", {"onnxruntime": lowering})
    with pytest.raises(PluginError, match=f"'broken-lowering'.*onnxruntime lowering of op 'PluginBroken{index}'.*{why}"
                       ) as err:
        lower_graph(_with_op_on_logits(tiny_graph, f"PluginBroken{index}"))
    assert err.value.plugin == "broken-lowering" and err.value.exit_code == 5


# -- frontends -------------------------------------------------------------------------------------------
def test_plugin_frontend_adds_an_architecture(manager, tmp_path):
    from tokopt.frontends.hf import ARCHITECTURES, supported_architectures

    calls: list[str] = []

    def build_as_llama(src):
        from tokopt.frontends.hf import llama

        calls.append(src.config.model_type)
        return llama.build(src)

    plugins.register_plugin(_plugin(tokopt_register_frontends=lambda: {"olmo": build_as_llama}), "olmo-frontend")
    try:
        assert "olmo" in supported_architectures()
        path = save_tiny_llama(tmp_path / "m", layers=1, with_tokenizer=False)
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "model_type": "olmo", "clip_qkv": None}))
        graph = tokopt.load(str(path))
        assert calls == ["olmo"] and "plugin olmo-frontend" in graph.history[0]
    finally:
        ARCHITECTURES.pop("olmo", None)


# -- discovery through real entry points ---------------------------------------------------------------------
def _fake_distribution(site: Path, dist: str, entry_points: str, modules: dict[str, str]) -> None:
    """What pip would install: a ``*.dist-info`` with METADATA and entry_points.txt, plus modules."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[tokopt]\n{entry_points}\n")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))


def _run_with_site(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_entry_point_discovery_is_lazy_and_a_broken_distribution_is_named(tmp_path):
    site = tmp_path / "site"
    _fake_distribution(site, "good-plugin", "good = good_manifest", {
        "good_manifest": '''
            from tokopt.plugins import hookimpl

            @hookimpl
            def tokopt_plugin_api_version():
                return 1

            @hookimpl
            def tokopt_register_passes():
                return {"good-pass": "good_heavy:GoodPass"}
        ''',
        "good_heavy": '''
            from tokopt.optimizer.pass_api import Pass, PassResult

            class GoodPass(Pass):
                name = "good-pass"
                summary = "from an entry point"

                def run(self, graph, ctx):
                    return PassResult(graph, False)
        ''',
    })
    _fake_distribution(site, "broken-plugin", "broken = broken_manifest", {
        "broken_manifest": "import a_dependency_that_is_not_installed\n",
    })
    result = _run_with_site(site, '''
        import json, sys
        from tokopt.passes.registry import get_pass_class, known_pass_names
        from tokopt.plugins import plugin_failures
        out = {"names": known_pass_names(), "heavy_after_listing": "good_heavy" in sys.modules}
        cls = get_pass_class("good-pass")
        out["plugin"] = cls.plugin
        out["failures"] = plugin_failures()
        try:
            get_pass_class("a-pass-only-the-broken-plugin-had")
        except Exception as exc:
            out["error"] = [type(exc).__name__, str(exc), exc.exit_code]
        print(json.dumps(out))
    ''')
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "good-pass" in out["names"]
    assert out["heavy_after_listing"] is False
    assert out["plugin"] == "good-plugin"
    assert "a_dependency_that_is_not_installed" in out["failures"]["broken-plugin"]
    kind, message, code = out["error"]
    assert kind == "PluginError" and "broken-plugin" in message and code == 5


def test_disable_env_skips_a_plugin(tmp_path):
    site = tmp_path / "site"
    _fake_distribution(site, "broken-plugin", "broken = broken_manifest", {"broken_manifest": "raise SystemError\n"})
    result = _run_with_site(site, '''
        import os
        os.environ["TOKOPT_DISABLE_PLUGINS"] = "broken-plugin"
        from tokopt.plugins import plugin_failures
        print(plugin_failures())
    ''')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "{}"


def test_cli_names_a_crashing_plugin_pass_and_leaves_no_output(tmp_path):
    """`tokopt optimize` with an installed plugin whose pass crashes: exit 5, the plugin named, no OUT."""
    site = tmp_path / "site"
    _fake_distribution(site, "crashing-plugin", "crash = crash_manifest", {
        "crash_manifest": '''
            from tokopt.plugins import hookimpl

            @hookimpl
            def tokopt_register_passes():
                return {"crash-pass": "crash_impl:CrashPass"}
        ''',
        "crash_impl": '''
            from tokopt.optimizer.pass_api import Pass

            class CrashPass(Pass):
                name = "crash-pass"
                summary = "always crashes"

                def run(self, graph, ctx):
                    return {}["missing key"]
        ''',
    })
    model = save_tiny_llama(tmp_path / "tiny", layers=1)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "tokopt.cli", "optimize", str(model), "--passes", "crash-pass",
                           "--backend", "torch", "-o", str(out), "--eval-tokens", "1x16", "--speed", "off"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 5, proc.stderr
    assert "crashing-plugin" in proc.stderr and "crash-pass" in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
