"""expert-prune: numerics against the definition (pruned experts masked out of routing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokopt
from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer import static_metrics, verify
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.weights import materialize
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.registry import get_pass_class


def _ctx(seed: int = 0) -> PassContext:
    g = torch.Generator().manual_seed(seed)
    return PassContext(calibration_batches=[torch.randint(0, 256, (2, 48), generator=g) for _ in range(2)])


def _masked_moe(graph, node, x, kept):
    """The definition: the original MoE with experts outside ``kept`` removed from routing."""
    a = node.attrs
    w = {r: materialize(graph.params[p]).float() for r, p in node.params.items()}
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(flat @ w["router"].T, dim=-1)
    mask = torch.zeros(a["num_experts"], dtype=torch.bool)
    mask[kept] = True
    probs = probs.masked_fill(~mask, 0.0)
    top, idx = torch.topk(probs, a["top_k"], dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(a["top_k"]):
            e = idx[t, j]
            h = F.silu(flat[t] @ w["experts.gate"][e].T) * (flat[t] @ w["experts.up"][e].T)
            out[t] += top[t, j] * (h @ w["experts.down"][e].T)
    return out.reshape(x.shape)


def test_pruned_mixtral_equals_masked_routing(tiny_model_dir):
    path, _ = tiny_model_dir("mixtral")
    graph = tokopt.load(path)
    result = get_pass_class("expert-prune")(keep=2).run(graph, _ctx())
    pruned = result.graph
    verify(pruned, stage="expert-prune")
    assert result.changed and len(result.notes) == 2
    before, after = static_metrics(graph), static_metrics(pruned)
    assert after.weight_bytes < before.weight_bytes
    layers, dropped, hidden, inter = 2, 2, 64, 96
    expert_bytes = layers * dropped * 3 * hidden * inter * 4  # gate, up, down of each dropped expert (fp32)
    router_bytes = layers * dropped * hidden * 4
    assert before.weight_bytes - after.weight_bytes == expert_bytes + router_bytes
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    _, captured = ReferenceExecutor(pruned).forward(ids, capture={"layers.0.moe"})
    x = captured["layers.0.moe"]
    kept = [int(k) for k in result.notes[0].split("[")[1].split("]")[0].split(",")]
    from tokopt.optimizer.interpret.kernels import StepContext, get_kernel

    ex = ReferenceExecutor(pruned)
    node = pruned.node("layers.0.moe")
    got = get_kernel("MoE")(node, [x], StepContext(ex.weight, torch.arange(16), ids, None))
    expected = _masked_moe(graph, graph.node("layers.0.moe"), x, kept)
    assert (got - expected).abs().max() <= 1e-5


def test_keep_everything_reports_no_change(tiny_model_dir):
    path, _ = tiny_model_dir("qwen2_moe")
    result = get_pass_class("expert-prune")(keep_ratio=1.0).run(tokopt.load(path), _ctx())
    assert not result.changed


def test_bad_options_and_dense_models(tiny_model_dir):
    cls = get_pass_class("expert-prune")
    with pytest.raises(PassOptionError, match="exactly one of"):
        cls()
    with pytest.raises(PassOptionError, match="valid options"):
        cls(keep=2, experts=3)
    path, _ = tiny_model_dir("llama")
    with pytest.raises(PreconditionError, match="no MoE layers"):
        cls(keep=2).check(tokopt.load(path), _ctx())
    path, _ = tiny_model_dir("mixtral")
    with pytest.raises(PreconditionError, match="no MoE layer among layers"):
        cls(keep=2, layers="5").check(tokopt.load(path), _ctx())
    with pytest.raises(PreconditionError, match="top_k=2"):
        cls(keep=1).check(tokopt.load(path), _ctx())


def test_layer_selection_prunes_only_those_layers(tiny_model_dir):
    path, _ = tiny_model_dir("mixtral")
    pruned = get_pass_class("expert-prune")(keep=2, layers="1").run(tokopt.load(path), _ctx()).graph
    assert [n.attrs["num_experts"] for n in pruned.nodes("MoE")] == [4, 2]
