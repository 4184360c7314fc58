"""The example plugin, installed: discovered lazily, runs, matches its definition, names itself on failure.

Run after ``pip install -e examples/tokopt-plugin-example``.  The pass is checked
differentially: pruning blocks from the IR must give the same logits as deleting the same
decoder layers from the ``transformers`` model.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
import types

import pytest
import torch

DIST = "tokopt-plugin-example"

try:
    importlib.metadata.distribution(DIST)
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - CI installs it first
    pytest.skip(f"{DIST} is not installed: pip install -e examples/tokopt-plugin-example", allow_module_level=True)

import tokopt  # noqa: E402
from tokopt.errors import PassOptionError, PluginError, PreconditionError  # noqa: E402
from tokopt.optimizer.interpret import ReferenceExecutor  # noqa: E402
from tokopt.optimizer.ir.cost import static_metrics  # noqa: E402
from tokopt.optimizer.pass_api import PassContext  # noqa: E402
from tokopt.passes.registry import get_pass_class, known_pass_names  # noqa: E402

LAYERS = 6


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def graph(hf_model):
    return tokopt.load(str(hf_model[1]))


def calibration(n: int = 2, length: int = 24) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, length), generator=gen) for _ in range(n)]


def hf_logits_without(model, removed: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The transformers model with decoder layers ``removed`` deleted."""
    import copy

    pruned = copy.deepcopy(model)
    pruned.model.layers = torch.nn.ModuleList(
        [layer for i, layer in enumerate(pruned.model.layers) if i not in removed])
    pruned.config.num_hidden_layers = len(pruned.model.layers)
    with torch.no_grad():
        return pruned(ids, use_cache=False).logits


def test_listed_without_importing_the_pass_module():
    code = textwrap.dedent("""
        import json, sys
        from tokopt.passes.registry import known_pass_names
        names = known_pass_names()
        print(json.dumps([names, "tokopt_plugin_example.prune_layers" in sys.modules]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    names, imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert "prune-layers" in names and imported is False


def test_resolves_to_the_plugin_pass():
    assert "prune-layers" in known_pass_names()
    cls = get_pass_class("prune-layers")
    assert cls.plugin == DIST and cls.describe()["plugin"] == DIST
    assert {o.name for o in cls.options} == {"num_layers", "strategy", "layers", "keep_last"}
    with pytest.raises(PassOptionError, match="valid options"):
        cls(depth=2)


def test_named_layers_match_transformers_with_those_layers_deleted(hf_model, graph):
    model, _ = hf_model
    p = get_pass_class("prune-layers")(layers=[2, 4])
    result = p.run(graph, PassContext())
    tokopt.verify(result.graph)
    assert result.changed and "removed blocks 2, 4" in result.notes[0]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ReferenceExecutor(result.graph).forward(ids), hf_logits_without(model, [2, 4], ids),
                               rtol=1e-4, atol=1e-4)
    assert result.graph.meta.num_layers == LAYERS - 2
    assert [n.attrs["layer_index"] for n in result.graph.nodes("Attention")] == list(range(LAYERS - 2))


@pytest.mark.parametrize("strategy", ["contiguous", "independent"])
def test_calibrated_pruning_moves_the_metrics_it_promises(graph, strategy):
    p = get_pass_class("prune-layers")(num_layers=2, strategy=strategy)
    result = p.run(graph, PassContext(calibration_batches=calibration()))
    tokopt.verify(result.graph)
    before, after = static_metrics(graph), static_metrics(result.graph)
    per_block = (before.params - after.params) / 2
    assert per_block > 0 and before.params - after.params == 2 * per_block
    assert after.kv_bytes_per_token == before.kv_bytes_per_token * (LAYERS - 2) / LAYERS
    assert after.flops_per_token < before.flops_per_token and after.weight_bytes < before.weight_bytes
    assert len(result.graph.nodes("Attention")) == LAYERS - 2
    removed = [int(x) for x in result.notes[0].split("removed blocks ")[1].split(" of")[0].split(", ")]
    assert LAYERS - 1 not in removed  # keep_last
    if strategy == "contiguous":
        assert removed[1] == removed[0] + 1
    cache = ReferenceExecutor(result.graph)
    ids = calibration(1)[0]
    assert cache.forward(ids).shape == (2, ids.shape[1], 128)


def test_preconditions_are_checked(graph):
    cls = get_pass_class("prune-layers")
    with pytest.raises(PreconditionError, match="calibration"):
        cls(num_layers=1).run(graph, PassContext())
    with pytest.raises(PreconditionError, match="at least one must stay"):
        cls(num_layers=LAYERS).check(graph, PassContext(calibration_batches=calibration(1)))
    with pytest.raises(PreconditionError, match="does not exist"):
        cls(layers=[LAYERS]).check(graph, PassContext())


def test_a_crashing_plugin_is_named(graph):
    """The failing-plugin path, with a deliberately broken plugin registered in-process."""
    from tokopt import plugins
    from tokopt.plugins import hookimpl

    prune = get_pass_class("prune-layers")

    class BrokenPrune(prune):
        name = "broken-prune"

        def run(self, graph, ctx):
            raise ZeroDivisionError("the plugin's own bug")

    broken = types.SimpleNamespace(tokopt_register_passes=hookimpl(lambda: {"broken-prune": BrokenPrune}))
    plugins.register_plugin(broken, "deliberately-broken-plugin")
    try:
        cls = get_pass_class("broken-prune")
        assert cls.plugin == "deliberately-broken-plugin"
        with pytest.raises(PluginError, match="'deliberately-broken-plugin'.*ZeroDivisionError") as err:
            with plugins.plugin_guard(cls.plugin, "pass 'broken-prune'"):
                cls(layers=[1]).run(graph, PassContext())
        assert err.value.exit_code == 5
    finally:
        plugins.unregister_plugin("deliberately-broken-plugin")
