"""Every frontend proves itself: logits parity with transformers, and cached decode == recompute."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES

import tokopt
from tokopt.optimizer.interpret import ReferenceExecutor


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers(arch, tiny_model_dir):
    path, hf = tiny_model_dir(arch)
    graph = tokopt.load(path)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = ReferenceExecutor(graph).forward(ids)
    assert expected.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_decode_equals_recompute(arch, tiny_model_dir):
    path, _ = tiny_model_dir(arch)
    executor = ReferenceExecutor(tokopt.load(path))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    full = executor.forward(ids)
    cache = executor.new_cache()
    steps = [executor.forward(ids[:, :10], cache)]
    steps += [executor.forward(ids[:, t:t + 1], cache) for t in range(10, 24)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_mistral_window_is_exercised(tiny_model_dir):
    """The sliding window (8) is shorter than the sequence: dropping it must change logits."""
    path, _ = tiny_model_dir("mistral")
    graph = tokopt.load(path)
    assert {n.attrs["window"] for n in graph.nodes("Attention")} == {8}
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(3))
    windowed = ReferenceExecutor(graph).forward(ids)
    full = graph.copy()
    for node in full.nodes("Attention"):
        node.attrs["window"] = None
    assert (ReferenceExecutor(full).forward(ids) - windowed).abs().max() > 1e-3


def test_greedy_generate_matches_transformers(tiny_model_dir):
    path, hf = tiny_model_dir("qwen3")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ReferenceExecutor(tokopt.load(path)).generate(ids, 16)
    assert got[0].tolist() == expected[0, 8:].tolist()
