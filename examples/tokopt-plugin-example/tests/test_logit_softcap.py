"""The plugin's op end to end: loaded and called by pluggy, inserted by its pass, run by the reference
executor through its torch kernel and by onnxruntime through its lowering — and a broken lowering named.

Run after ``pip install -e examples/tokopt-plugin-example``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import types

import pytest
import torch

DIST = "tokopt-plugin-example"
CAP = 0.5  # the tiny model's logits reach about ±0.6, so this cap visibly bends them

try:
    importlib.metadata.distribution(DIST)
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - CI installs it first
    pytest.skip(f"{DIST} is not installed: pip install -e examples/tokopt-plugin-example", allow_module_level=True)
pytest.importorskip("onnxruntime")

import tokopt  # noqa: E402
from tokopt import plugins  # noqa: E402
from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend  # noqa: E402
from tokopt.errors import PluginError, PreconditionError  # noqa: E402
from tokopt.optimizer.interpret import ReferenceExecutor  # noqa: E402
from tokopt.optimizer.ir.graph import Graph  # noqa: E402
from tokopt.optimizer.manager import run_pass  # noqa: E402
from tokopt.optimizer.pass_api import PassContext  # noqa: E402
from tokopt.passes.registry import get_pass_class  # noqa: E402
from tokopt.plugins import hookimpl  # noqa: E402


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Graph:
    """A tiny random llama (the shape of tokopt's ``tests/tiny_models.py``), two layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return tokopt.load(str(path))


@pytest.fixture(scope="module")
def capped(graph) -> Graph:
    """The graph after ``logit-softcap``, run by the pass manager (which checks the pass's declarations)."""
    return run_pass(get_pass_class("logit-softcap")(cap=CAP), graph, PassContext(), 1).graph


def token_ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def test_the_manifest_is_loaded_and_called_by_pluggy():
    manager = plugins.get_plugin_manager()
    manager.discover()
    info = manager.plugins[DIST]
    assert [dist.project_name for _, dist in info.pm.list_plugin_distinfo()] == [DIST]  # its entry point, via pluggy
    (passes,) = info.pm.hook.tokopt_register_passes()
    assert passes["logit-softcap"] == "tokopt_plugin_example.softcap:SoftcapLogits"
    assert info.pm.hook.tokopt_register_ops() == [["tokopt_plugin_example.softcap:LOGIT_SOFTCAP"]]


def test_the_pass_inserts_the_op_and_the_reference_runs_its_kernel(graph, capped):
    assert capped.producer(capped.outputs["logits"]).op == "LogitSoftcap"
    assert "LogitSoftcap" not in {n.op for n in graph.nodes()}  # the input graph is untouched
    ids = token_ids()
    base = ReferenceExecutor(graph).forward(ids)
    torch.testing.assert_close(ReferenceExecutor(capped).forward(ids), CAP * torch.tanh(base / CAP))
    assert float(base.abs().max()) > CAP  # so the cap really bent something
    with pytest.raises(PreconditionError, match="already softcapped"):
        get_pass_class("logit-softcap")(cap=CAP).check(capped, PassContext())


def test_onnxruntime_lowers_the_op_and_matches_the_reference(capped, tmp_path):
    import onnx

    backend = OnnxRuntimeBackend()
    ids = token_ids()
    artifact = backend.lower(capped, tmp_path / "ort", parity_tokens=ids)  # refused unless in parity
    assert artifact.extra["parity"]["passed"]
    model = onnx.load(str(tmp_path / "ort" / "model.onnx"), load_external_data=False)
    assert "Tanh" in {n.op_type for n in model.graph.node}  # the plugin's lowering, not a fallback
    torch.testing.assert_close(backend.load(tmp_path / "ort").forward(ids), ReferenceExecutor(capped).forward(ids),
                               rtol=1e-4, atol=1e-4)


def test_a_crashing_lowering_names_its_plugin(graph, tmp_path):
    """The same op under another name, from a deliberately broken plugin registered in-process."""
    from tokopt_plugin_example.softcap import LOGIT_SOFTCAP

    def broken_lowering(ctx, node, inputs):
        raise ValueError("the lowering's own bug")

    broken = dataclasses.replace(LOGIT_SOFTCAP, spec=dataclasses.replace(LOGIT_SOFTCAP.spec, name="BrokenSoftcap"),
                                 lowerings={"onnxruntime": broken_lowering})
    plugins.register_plugin(types.SimpleNamespace(tokopt_register_ops=hookimpl(lambda: [broken])),
                            "deliberately-broken-lowering")
    try:
        plugins.install_plugin_ops()
        g = graph.copy()
        g.outputs["logits"] = g.add_node("BrokenSoftcap", "broken_softcap", [g.outputs["logits"]], {"cap": CAP})
        with pytest.raises(PluginError, match="'deliberately-broken-lowering'.*lowering of op 'BrokenSoftcap'.*"
                                              "ValueError: the lowering's own bug") as err:
            OnnxRuntimeBackend().lower(g, tmp_path / "ort")
        assert err.value.exit_code == 5 and not (tmp_path / "ort").exists()
    finally:
        plugins.unregister_plugin("deliberately-broken-lowering")
