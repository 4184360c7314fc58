"""gqa: KV-head merging on MHA (gpt2) and GQA (llama) models — the mean-pool definition checked
against a hand-built transformers model, the calibrated merge exact where the heads really are
redundant, options and preconditions, healing, and the KV bytes it buys."""

from __future__ import annotations

import pytest
import torch

import tokopt
from tokopt.errors import PassOptionError, PreconditionError
from tokopt.measure.quality import mean_kl
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.ir.verify import verify
from tokopt.optimizer.ir.weights import materialize
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.gqa import GroupedQueryAttention
from tokopt.passes.registry import get_pass_class

pytestmark = pytest.mark.usefixtures("one_thread")


def random_ids(seq: int, batch: int = 1, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def calib(n: int = 4, seq: int = 64) -> PassContext:
    return PassContext(calibration_batches=[random_ids(seq, seed=100 + i) for i in range(n)])


def convert(graph, ctx=None, **opts):
    res = GroupedQueryAttention(**opts).run(graph, ctx or calib())
    verify(res.graph, "gqa")
    return res


@pytest.fixture(scope="module")
def gpt2_12_heads(tmp_path_factory):
    """A tiny random MHA gpt2 with 12 heads of width 8."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_embd=96, n_layer=2, n_head=12, n_positions=128, initializer_range=0.2,
                     attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("gpt2_12")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tokopt.load(tiny_model_dir("llama")[0])


def test_mean_pool_on_gpt2_matches_hand_computed_conversion(gpt2_12_heads):
    """MHA 12 → 4: the converted graph equals gpt2 whose K/V heads are replaced by their group means.

    Duplicating the mean head across its group in an MHA model is GQA written the long way,
    so transformers' own gpt2 computes the reference output.
    """
    path, hf = gpt2_12_heads
    g = tokopt.load(path)
    res = convert(g, PassContext(), num_kv_heads=4, method="mean")
    assert {n.attrs["num_kv_heads"] for n in res.graph.nodes("Attention")} == {4}
    assert static_metrics(res.graph).kv_bytes_per_token * 3 == static_metrics(g).kv_bytes_per_token

    import copy

    pooled = copy.deepcopy(hf)
    hidden, d = 96, 8
    with torch.no_grad():
        for block in pooled.transformer.h:
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: (in, 3*hidden), columns q|k|v
            for part in (1, 2):  # k, v
                cols = w[:, part * hidden:(part + 1) * hidden].reshape(hidden, 4, 3, d)
                w[:, part * hidden:(part + 1) * hidden] = cols.mean(2, keepdim=True).expand_as(cols).reshape(hidden, -1)
                bias = b[part * hidden:(part + 1) * hidden].reshape(4, 3, d)
                b[part * hidden:(part + 1) * hidden] = bias.mean(1, keepdim=True).expand_as(bias).reshape(-1)
    ids = random_ids(30, batch=2)
    with torch.no_grad():
        expected = pooled(ids).logits
    torch.testing.assert_close(ReferenceExecutor(res.graph).forward(ids), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, hf(ids).logits, atol=1e-3)  # the conversion did change the model


def _make_heads_redundant(graph, ratio: int):
    """Rewrite k/v weights so each group of ``ratio`` KV heads carries one head's information.

    Keys of head j are head 0's keys times a complex number per rotary plane (what the
    calibrated merge can represent through RoPE); values are an invertible linear map of
    head 0's values.  The calibrated merge must then be exact.
    """
    g = graph.copy()
    gen = torch.Generator().manual_seed(7)
    for node in g.nodes("Attention"):
        d, half = node.attrs["head_dim"], node.attrs["head_dim"] // 2
        k_node, v_node = (g.producer(v) for v in g.inputs_of(node.name)[1:])
        for lin in (k_node, v_node):
            w = materialize(g.params[lin.params["weight"]]).clone()
            for m in range(node.attrs["num_kv_heads"] // ratio):
                base = w[m * ratio * d:(m * ratio + 1) * d].clone()
                for j in range(1, ratio):
                    rows = slice((m * ratio + j) * d, (m * ratio + j + 1) * d)
                    if lin is k_node:
                        c = torch.randn(half, 2, generator=gen)
                        re, im = base[:half], base[half:]
                        w[rows] = torch.cat([c[:, :1] * re - c[:, 1:] * im, c[:, 1:] * re + c[:, :1] * im])
                    else:
                        w[rows] = (torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen)) @ base
            name = lin.params["weight"] + ".redundant"
            g.add_param(name, w)
            lin.params["weight"] = name
    g.eliminate_dead_code()
    return g


def test_calibrated_merge_is_exact_for_redundant_heads(llama):
    g = _make_heads_redundant(llama, ratio=2)
    ids = random_ids(40, batch=2, seed=3)
    ref = ReferenceExecutor(g).forward(ids)
    calibrated = ReferenceExecutor(convert(g, num_kv_heads=1, method="calibrated").graph).forward(ids)
    mean = ReferenceExecutor(convert(g, num_kv_heads=1, method="mean").graph).forward(ids)
    torch.testing.assert_close(calibrated, ref, rtol=2e-3, atol=2e-3)
    assert (mean - ref).abs().max() > 100 * (calibrated - ref).abs().max()


def test_calibrated_beats_mean_on_mha_gpt2(gpt2_12_heads):
    g = tokopt.load(gpt2_12_heads[0])
    ids = random_ids(48, batch=2, seed=5)
    ref = ReferenceExecutor(g).forward(ids)
    ctx = calib(n=8, seq=64)
    kl = {m: mean_kl(ref, ReferenceExecutor(convert(g, ctx, num_kv_heads=4, method=m).graph).forward(ids))
          for m in ("mean", "calibrated")}
    assert kl["calibrated"] < kl["mean"]


def test_kv_bytes_per_token_shrink_exactly(llama):
    res = convert(llama, num_kv_heads=1)
    before, after = static_metrics(llama), static_metrics(res.graph)
    assert after.kv_bytes_per_token * 2 == before.kv_bytes_per_token
    for node in res.graph.nodes("Attention"):
        k_node = res.graph.producer(res.graph.inputs_of(node.name)[1])
        assert res.graph.params[k_node.params["weight"]].shape == (node.attrs["head_dim"], 64)
    assert "0.500×" in res.notes[0]


def test_decode_with_cache_equals_full_recompute(llama):
    g = convert(llama, num_kv_heads=1).graph
    ex = ReferenceExecutor(g)
    ids = random_ids(20, seed=4)
    cache = ex.new_cache()
    steps = [ex.forward(ids[:, :4], cache)] + [ex.forward(ids[:, t:t + 1], cache) for t in range(4, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), ex.forward(ids), rtol=1e-4, atol=1e-4)


def test_layer_selection_and_error_budget(llama):
    res = convert(llama, num_kv_heads=1, method="mean", layers=[1])
    heads = {n.attrs["layer_index"]: n.attrs["num_kv_heads"] for n in res.graph.nodes("Attention")}
    assert heads == {0: 2, 1: 1}
    none = GroupedQueryAttention(num_kv_heads=1, max_error=0.0).run(llama, calib())
    assert not none.changed and none.graph is llama
    every = convert(llama, num_kv_heads=1, max_error=100.0)
    assert {n.attrs["num_kv_heads"] for n in every.graph.nodes("Attention")} == {1}
    assert all("block error" in n for n in every.notes[1:])


def test_options_and_preconditions(llama, tiny_model_dir):
    assert get_pass_class("gqa") is GroupedQueryAttention
    with pytest.raises(PassOptionError, match="num_kv_heads is required"):
        GroupedQueryAttention()
    with pytest.raises(PassOptionError, match="one of"):
        GroupedQueryAttention(num_kv_heads=1, method="svd")
    with pytest.raises(PreconditionError, match="must divide .* valid values: 1, 2"):
        GroupedQueryAttention(num_kv_heads=3).check(llama, PassContext())
    with pytest.raises(PreconditionError, match="must divide"):
        GroupedQueryAttention(num_kv_heads=4).check(llama, PassContext())  # cannot split heads
    qwen3 = tokopt.load(tiny_model_dir("qwen3")[0])
    with pytest.raises(PreconditionError, match="qk_norm"):
        GroupedQueryAttention(num_kv_heads=1, method="calibrated").check(qwen3, PassContext())
    verify(convert(qwen3, PassContext(), num_kv_heads=1, method="mean").graph, "gqa")
    unchanged = GroupedQueryAttention(num_kv_heads=2).run(llama, PassContext())
    assert not unchanged.changed


def test_healing_reduces_divergence(llama):
    ctx = calib(n=2, seq=32)
    ids = torch.cat(ctx.calibration_batches)  # the loop must fit what it trains on
    ref = ReferenceExecutor(llama).forward(ids)
    plain = convert(llama, ctx, num_kv_heads=1, method="mean")
    healed = convert(llama, ctx, num_kv_heads=1, method="mean", heal_steps=30, heal_lr=1e-2, heal_seq_len=32,
                     heal_held_out=0)
    assert any("healed 30 steps" in n for n in healed.notes)
    kl_plain = mean_kl(ref, ReferenceExecutor(plain.graph).forward(ids))
    kl_healed = mean_kl(ref, ReferenceExecutor(healed.graph).forward(ids))
    assert kl_healed < 0.5 * kl_plain
    assert {n.attrs["num_kv_heads"] for n in healed.graph.nodes("Attention")} == {1}
    assert static_metrics(healed.graph).params == static_metrics(plain.graph).params


def test_healing_keeps_the_checkpoint_with_the_lowest_held_out_kl(llama):
    """Held-out sequences pick the checkpoint: a sane run keeps a later step and lowers their KL; a run that
    only damages the model (a huge learning rate) keeps the unhealed weights, bit for bit."""
    ctx = calib(n=8, seq=32)
    held_out = torch.cat(ctx.calibration_batches[-2:])
    ref = ReferenceExecutor(llama).forward(held_out)
    plain = convert(llama, ctx, num_kv_heads=1, method="mean")
    healed = convert(llama, ctx, num_kv_heads=1, method="mean", heal_steps=20, heal_lr=1e-2, heal_seq_len=32,
                     heal_held_out=2)
    note = next(n for n in healed.notes if n.startswith("healed"))
    first, best = (float(x) for x in note.split("held-out KL ")[1].split(",")[0].split(" → "))
    assert best < first and "kept step 0 " not in note
    assert mean_kl(ref, ReferenceExecutor(healed.graph).forward(held_out)) == pytest.approx(best, rel=1e-3)
    wrecked = convert(llama, ctx, num_kv_heads=1, method="mean", heal_steps=4, heal_lr=5.0, heal_seq_len=32,
                      heal_held_out=2)
    assert any("unhealed weights kept" in n for n in wrecked.notes)
    torch.testing.assert_close(ReferenceExecutor(wrecked.graph).forward(held_out),
                               ReferenceExecutor(plain.graph).forward(held_out), rtol=0, atol=0)


def test_healing_needs_sequences_beyond_the_held_out_ones(llama):
    with pytest.raises(PreconditionError, match="heal_held_out=4"):
        convert(llama, calib(n=2, seq=32), num_kv_heads=1, method="mean", heal_steps=2, heal_seq_len=32)


def test_refinement_fits_each_block_and_the_model(llama):
    """Block-local refinement lowers each converted block's error (its loss is the max_error metric) and the
    model's divergence from the original (on the calibration tokens: random ids of a random model carry no
    structure to generalise)."""
    ctx = calib(n=4, seq=64)
    ids = torch.cat(ctx.calibration_batches)
    ref = ReferenceExecutor(llama).forward(ids)
    plain = convert(llama, ctx, num_kv_heads=1, method="mean", max_error=1e9)  # max_error: report block errors
    refined = convert(llama, ctx, num_kv_heads=1, method="mean", max_error=1e9, refine_steps=60, refine_lr=1e-2)
    errors = {r: [float(n.split("block error ")[1].rstrip(")")) for n in res.notes if "block error" in n]
              for r, res in (("plain", plain), ("refined", refined))}
    assert errors["plain"] and all(b < 0.5 * a for a, b in zip(errors["plain"], errors["refined"], strict=True))
    kl_plain = mean_kl(ref, ReferenceExecutor(plain.graph).forward(ids))
    kl_refined = mean_kl(ref, ReferenceExecutor(refined.graph).forward(ids))
    assert kl_refined < 0.8 * kl_plain
    verify(refined.graph, "test")

