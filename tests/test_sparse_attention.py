"""sparse-attention: window + sinks on the IR, parity with transformers' sliding window,
bounded (flat) KV memory while decoding past the window, and the StreamingLLM effect on SmolLM2."""

from __future__ import annotations

import pytest
import torch

import tokopt
from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.cost import kv_bytes_for_context
from tokopt.optimizer.ir.verify import verify
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.registry import get_pass_class
from tokopt.passes.sparse_attention import SparseAttention

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tokopt.load(tiny_model_dir("llama")[0])


def sparse(graph, **opts):
    res = SparseAttention(**opts).run(graph, PassContext())
    verify(res.graph, "sparse-attention")
    return res


def test_sets_window_and_sinks_on_selected_layers(llama):
    res = sparse(llama, window=8, sinks=2, layers=[1])
    assert res.changed and "window=8, sinks=2 on 1 layer(s): 1" in res.notes[0]
    attn = {n.attrs["layer_index"]: n.attrs for n in res.graph.nodes("Attention")}
    assert (attn[1]["window"], attn[1]["sinks"]) == (8, 2)
    assert (attn[0]["window"], attn[0]["sinks"]) == (None, 0)
    assert llama.nodes("Attention")[1].attrs["window"] is None  # the input graph is untouched
    assert not SparseAttention(window=8, sinks=2, layers=[1]).run(res.graph, PassContext()).changed


def test_kv_bytes_capped_at_window_plus_sinks(llama):
    g = sparse(llama, window=16, sinks=4).graph
    for context in (8, 20, 512):
        expected = kv_bytes_for_context(llama, min(context, 20))
        assert kv_bytes_for_context(g, context) == expected


def test_options_and_preconditions(llama):
    assert get_pass_class("sparse-attention") is SparseAttention
    with pytest.raises(PassOptionError, match="window"):
        SparseAttention(window=0)
    with pytest.raises(PassOptionError, match="sinks"):
        SparseAttention(sinks=-1)
    with pytest.raises(PassOptionError, match="layers \\[7\\] do not exist"):
        SparseAttention(layers="7").check(llama, PassContext())
    empty = llama.copy()
    empty.nx.remove_nodes_from([n.name for n in empty.nodes("Attention")])
    with pytest.raises(PreconditionError, match="no Attention"):
        SparseAttention().check(empty, PassContext())
    assert SparseAttention(window=64, sinks=0, layers="0-1").spec() == "sparse-attention:window=64,sinks=0,layers=0;1"


def test_window_only_matches_transformers_sliding_window(tiny_model_dir):
    """A windowed model from the pass equals transformers' Mistral with the same sliding_window."""
    path, hf = tiny_model_dir("mistral")  # trained-in window of 8
    g = tokopt.load(path)
    unwindowed = g.copy()
    for node in unwindowed.nodes("Attention"):
        node.attrs["window"] = None
    g2 = sparse(unwindowed, window=hf.config.sliding_window, sinks=0).graph
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    ex = ReferenceExecutor(g2)
    torch.testing.assert_close(ex.forward(ids), ref, rtol=1e-4, atol=1e-4)
    cache = ex.new_cache()
    steps = [ex.forward(ids[:, :5], cache)] + [ex.forward(ids[:, t:t + 1], cache) for t in range(5, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-4)


def test_decode_with_cache_equals_full_recompute_past_the_window(llama):
    g = sparse(llama, window=6, sinks=2).graph
    ex = ReferenceExecutor(g)
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(1))
    full = ex.forward(ids)
    cache = ex.new_cache()
    steps = [ex.forward(ids[:, :3], cache)] + [ex.forward(ids[:, t:t + 1], cache) for t in range(3, 50)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    # and the window changes the result once the context is longer than window + sinks
    assert not torch.allclose(full[:, 20:], ReferenceExecutor(llama).forward(ids)[:, 20:], atol=1e-3)


def test_kv_memory_stays_flat_while_generating(llama):
    g = sparse(llama, window=16, sinks=4).graph
    ex = ReferenceExecutor(g)
    cache = ex.new_cache()
    logits = ex.forward(torch.tensor([[5, 6, 7]]), cache)
    sizes = []
    for _ in range(120):
        logits = ex.forward(logits[:, -1:].argmax(-1), cache)
        sizes.append(cache.nbytes())
    assert len(set(sizes[30:])) == 1  # full after sinks + window tokens, then constant
    assert sizes[-1] == kv_bytes_for_context(g, 10_000)
    grown = ReferenceExecutor(llama)
    cache = grown.new_cache()
    grown.forward(torch.arange(123)[None] % 256, cache)
    assert cache.nbytes() > 5 * sizes[-1]


@pytest.mark.smollm2
def test_sinks_rescue_windowed_smollm2(smollm2_graph):
    """StreamingLLM on the real model, at a small scale: window 64 at 512 tokens, with and without sinks."""
    from tokopt.measure.quality import eval_tokens, perplexity

    ids = eval_tokens(smollm2_graph, 512)

    def ppl(graph):
        return perplexity(ReferenceExecutor(graph).forward, [ids])

    full = ppl(smollm2_graph)
    with_sinks = ppl(sparse(smollm2_graph, window=64, sinks=4).graph)
    without = ppl(sparse(smollm2_graph, window=64, sinks=0).graph)
    assert full < with_sinks < without
    assert with_sinks / full - 1 < 0.5 * (without / full - 1)


def test_cli_generate_applies_passes(tmp_path):
    """``tokopt generate --passes`` runs the pipeline first; a bad pass is a one-line error, exit 2."""
    import json

    from click.testing import CliRunner
    from tiny_models import save_tiny_llama

    from tokopt.cli import cli

    path = save_tiny_llama(tmp_path / "llama", layers=2)
    runner = CliRunner()
    args = ["generate", str(path), "--prompt", "w5 w6 w7", "--max-new-tokens", "40", "--json"]
    plain = runner.invoke(cli, args)
    windowed = runner.invoke(cli, [*args, "--passes", "sparse-attention:window=4,sinks=1"])
    assert plain.exit_code == 0 and windowed.exit_code == 0, (plain.output, windowed.output)
    a, b = json.loads(plain.output)["new_ids"], json.loads(windowed.output)["new_ids"]
    assert a[:2] == b[:2]  # identical while the context fits in sinks + window
    bad = runner.invoke(cli, [*args, "--passes", "sparse-attention:window=0"])
    assert bad.exit_code == 2 and "window" in bad.output
