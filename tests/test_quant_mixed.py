"""Mixed precision: the allocator against brute force, the KL estimate against measured KL, the pass end to end."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
import torch
from tiny_models import sample_ids, save_tiny_llama

import tokopt
from tokopt.errors import PassOptionError
from tokopt.measure.quality import mean_kl
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.ir.verify import verify
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.quant.allocate import Candidate, Format, allocate, allocate_in_order, hull
from tokopt.passes.quant.rtn import fake_quantize, quantize_rtn
from tokopt.passes.quant.sensitivity import estimate_kl
from tokopt.passes.quantize import QuantizePass

F4, F8 = Format(4, 32, True), Format(8, 32, True)


def test_format_bytes_count_codes_scales_and_zeros():
    assert F4.nbytes((8, 64), 2) == 8 * 64 // 2 + 8 * 2 * 2
    assert Format(4, 64, False).nbytes((8, 64), 4) == 8 * 64 // 2 + 8 * (4 + 1)
    assert F8.nbytes((8, 64), 2) == 8 * 64 + 8 * 2 * 2


def test_fake_quantize_equals_the_stored_format_read_back():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for bits, gs, sym in [(4, 32, True), (4, 64, False), (8, -1, True)]:
        assert torch.equal(fake_quantize(w, bits, gs, sym), quantize_rtn(w, bits, gs, sym).dequantize())


def test_hull_drops_dominated_and_above_hull_candidates():
    a, b, c, d = (Candidate(F4, 10, 1.0), Candidate(F4, 20, 0.9), Candidate(F8, 30, 0.1), Candidate(F8, 40, 0.5))
    assert hull([d, c, b, a]) == [a, c]  # b lies above the segment a→c; d is larger and worse than c


def _brute_force(cands: dict[str, list[Candidate]], max_bytes: int) -> float:
    best = float("inf")
    for combo in itertools.product(*cands.values()):
        if sum(c.nbytes for c in combo) <= max_bytes:
            best = min(best, sum(c.kl for c in combo))
    return best


def test_allocate_matches_brute_force_when_upgrades_fit_exactly():
    rng = random.Random(0)
    for _ in range(50):
        cands = {f"t{i}": [Candidate(F4, 4, rng.uniform(0.1, 1.0)), Candidate(F8, 8, rng.uniform(0.0, 0.05))]
                 for i in range(6)}
        budget = 4 * 6 + 4 * rng.randint(0, 6)  # equal upgrade sizes: the greedy is exactly optimal
        got = allocate(cands, max_bytes=budget)
        assert got.nbytes <= budget
        assert got.kl == pytest.approx(_brute_force(cands, budget))


def test_allocate_within_max_kl_takes_the_fewest_bytes_it_needs():
    cands = {"a": [Candidate(F4, 4, 1.0), Candidate(F8, 8, 0.0)], "b": [Candidate(F4, 4, 0.1), Candidate(F8, 8, 0.0)]}
    got = allocate(cands, max_kl=0.5)
    assert got.choice["a"].format == F8 and got.choice["b"].format == F4 and got.kl == pytest.approx(0.1)


def test_allocate_in_order_ignores_the_estimates():
    cands = {"a": [Candidate(F4, 4, 1.0), Candidate(F8, 8, 0.0)], "b": [Candidate(F4, 4, 0.1), Candidate(F8, 8, 0.0)]}
    got = allocate_in_order(cands, ["b", "a"], max_bytes=12)
    assert got.choice["b"].format == F8 and got.choice["a"].format == F4


# -- on a tiny llama ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tokopt.load(str(save_tiny_llama(tmp_path_factory.mktemp("mixed_tiny"))))


def _calib(n: int = 8, seq: int = 64) -> list[torch.Tensor]:
    return [sample_ids(1, seq, 128, seed=300 + i) for i in range(n)]


def _with_weight(graph, param: str, value: torch.Tensor):
    g = graph.copy()
    g.params[param] = value
    return g


def test_estimated_kl_ranks_tensors_like_the_measured_kl(tiny):
    """The estimate is a second-order approximation: it must order tensors as their measured KL-alone does."""
    params = sorted({n.params["weight"] for n in tiny.nodes() if n.op == "Linear"})
    quant = {p: {"int4": lambda w: fake_quantize(w, 4, 32, True)} for p in params}
    batches = _calib()
    est = estimate_kl(tiny, batches, quant)
    ids = torch.cat(batches)
    base = ReferenceExecutor(tiny).forward(ids)
    measured = {}
    for p in params:
        q = fake_quantize(materialize(tiny.params[p], torch.float32), 4, 32, True)
        measured[p] = mean_kl(base, ReferenceExecutor(_with_weight(tiny, p, q)).forward(ids))
    e = torch.tensor([est[p]["int4"] for p in params])
    m = torch.tensor([measured[p] for p in params])
    rank = lambda x: x.argsort().argsort().float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(e), rank(m)]))[0, 1]
    assert spearman > 0.8, (spearman, est, measured)
    assert 0.25 < float(e.sum() / m.sum()) < 4.0  # and the magnitude is the KL's, not just its order


def test_budget_places_int8_on_the_most_sensitive_tensors_and_meets_the_budget(tiny):
    base_bits = static_metrics(QuantizePass(bits=4, group_size=32).preview(tiny, PassContext())).bits_per_param
    budget = base_bits + 0.6
    p = QuantizePass(bits=4, group_size=32, budget_bits=budget, method="rtn")
    ctx = PassContext(calibration_batches=_calib())
    p.check(tiny, ctx)
    result = p.run(tiny, ctx)
    verify(result.graph, "quantize")
    bits = static_metrics(result.graph).bits_per_param
    assert base_bits < bits <= budget
    table = result.tables["sensitivity"]
    assert {r["tensor"] for r in table} == {t for t, w in result.graph.params.items() if isinstance(w, QuantizedWeight)}
    chosen8 = {r["tensor"] for r in table if r["chosen"].startswith("int8")}
    assert chosen8 and all(result.graph.params[t].bits == 8 for t in chosen8)
    # the upgraded tensors are among the most sensitive: each loses more (estimated, per parameter) in int4
    # than the typical tensor kept in 4 bits (the exact choice is the knapsack's, checked above by brute force)
    loss = {r["tensor"]: r["est_kl"]["int4 g32"] / r["params"] for r in table}
    kept = sorted(loss[t] for t in loss if t not in chosen8)
    assert min(loss[t] for t in chosen8) > kept[len(kept) // 2]
    assert any("mixed precision" in n for n in result.notes)


def test_budget_below_the_cheapest_mix_is_refused_before_calibration(tiny):
    p = QuantizePass(bits=4, group_size=32, budget_bits=3.0)
    with pytest.raises(PassOptionError, match="budget_bits=3 is below"):
        p.check(tiny, PassContext())


def test_kv_bits_alone_leaves_the_weights_alone(tiny):
    result = QuantizePass(kv_bits=8).run(tiny, PassContext())
    assert not any(isinstance(w, QuantizedWeight) for w in result.graph.params.values())
    assert all(n.attrs["kv_cache"]["dtype"] == "int8" for n in result.graph.nodes("Attention"))
    both = QuantizePass(bits=8, kv_bits=8).run(tiny, PassContext())
    assert any(isinstance(w, QuantizedWeight) for w in both.graph.params.values())


def test_a_budget_below_the_asked_groups_is_met_with_larger_groups_on_the_least_sensitive(tiny):
    def bits(group: int) -> float:
        return static_metrics(QuantizePass(bits=4, group_size=group).preview(tiny, PassContext())).bits_per_param

    budget = (bits(32) + bits(64)) / 2  # too few bits for g32 everywhere, more than g64 everywhere needs
    result = QuantizePass(bits=4, group_size=32, budget_bits=budget, method="rtn").run(
        tiny, PassContext(calibration_batches=_calib()))
    verify(result.graph, "quantize")
    assert static_metrics(result.graph).bits_per_param <= budget
    table = {r["tensor"]: r for r in result.tables["sensitivity"]}
    group = {t: int(r["chosen"].split()[1][1:]) for t, r in table.items() if r["chosen"].startswith("int4")}
    wider, kept = [t for t, g in group.items() if g > 32], [t for t, g in group.items() if g == 32]
    assert wider and kept and all(result.graph.params[t].group_size == group[t] for t in group)
    # the tensors moved to larger groups are, typically, those that lose less to them
    loss = {t: (r["est_kl"]["int4 g64"] - r["est_kl"]["int4 g32"]) / r["params"] for t, r in table.items()}
    assert statistics.median(loss[t] for t in wider) <= statistics.median(loss[t] for t in kept)


def test_with_run_time_int8_activations_int8_takes_groups_not_channels(tiny):
    """act_bits quantizes a Linear's input in blocks of its weight's group: a mixed int8 tensor then keeps
    groups (onnxruntime's int8 kernel, and activations quantized per block), never one group per channel."""
    ctx = PassContext(calibration_batches=_calib(), backend="onnxruntime")
    base_bits = static_metrics(QuantizePass(bits=4, group_size=32).preview(tiny, ctx)).bits_per_param
    result = QuantizePass(bits=4, group_size=32, budget_bits=base_bits + 0.6, method="rtn").run(tiny, ctx)
    verify(result.graph, "quantize")
    upgraded = [t for t, w in result.graph.params.items() if isinstance(w, QuantizedWeight) and w.bits == 8]
    assert upgraded and all(result.graph.params[t].group_size <= 128 for t in upgraded)
    reads = {n.params["weight"]: n.attrs.get("act_quant") for n in result.graph.nodes("Linear")}
    assert all(reads[t] == {"bits": 8, "block": result.graph.params[t].group_size} for t in upgraded if t in reads)


def test_int8_candidates_follow_the_activation_blocks_on_smollm2_widths():
    """576 = 64·9 (SmolLM2's hidden size): per channel is no power-of-two block; with run-time int8 activations
    the int8 candidates are the int4 candidates' groups instead."""
    from tokopt.passes.quant.mixed import formats_for
    from tokopt.passes.quant.weights import Target

    t = Target("w", ("n",), 4, True, group_size=32)
    int8 = lambda fs: sorted(f.group_size for f in fs if f.bits == 8)  # noqa: E731
    assert int8(formats_for(t, 576)) == [32, 576]
    assert int8(formats_for(t, 576, act_blocks=True)) == [32, 64]  # 128 does not divide 576
    assert int8(formats_for(t, 1536, act_blocks=True)) == [32, 64, 128]
