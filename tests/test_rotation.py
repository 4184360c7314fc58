"""Rotations folded into the weights before GPTQ: orthonormal, exact in float, applied only where they fold."""

from __future__ import annotations

import pytest
import torch
from tiny_models import sample_ids, save_tiny_llama

import tokopt
from tokopt.errors import PreconditionError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.graph import Value
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.quant.rotation import NotRotatable, hadamard, rotate_residual, rotate_value_heads
from tokopt.passes.quantize import QuantizePass


@pytest.mark.parametrize("n", [1, 2, 64, 576, 896, 960, 1536, 5120])
def test_hadamard_is_orthonormal_with_entries_of_one_magnitude(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_hadamard_refuses_an_order_without_a_construction():
    with pytest.raises(ValueError, match="order 90"):
        hadamard(90)


def _logits(graph, ids):
    ex = ReferenceExecutor(graph)
    return ex.forward(ids, ex.new_cache())


@pytest.mark.parametrize("tied", [False, True])
def test_rotations_leave_the_float_model_unchanged(tmp_path, tied):
    graph = tokopt.load(str(save_tiny_llama(tmp_path / "m", tie_word_embeddings=tied)))
    rotated = graph.copy()
    added = rotate_residual(rotated, seed=3)
    assert rotate_value_heads(rotated) == 4
    ids = sample_ids(seq=24)
    assert torch.allclose(_logits(rotated, ids), _logits(graph, ids), atol=1e-5)
    # the weights did change: the stream is rotated (the embedding's rows), the norms carry no gain
    table = graph.node("embed_tokens").params["weight"]
    assert not torch.allclose(materialize(rotated.params[table]), materialize(graph.params[table]), atol=1e-3)
    norm = rotated.node("layers.0.input_norm").params["weight"]
    assert torch.equal(materialize(rotated.params[norm]), torch.ones(64))
    # a tied lm_head reads the rotated table through the final norm's matrix Q^T diag(g) Q; untied: no new node
    assert added == (["final_norm.rotation"] if tied else [])
    if tied:
        assert rotated.inputs_of("lm_head") == [Value("final_norm.rotation", 0)]


def test_a_stream_read_by_something_other_than_a_norm_is_not_rotated(tmp_path):
    graph = tokopt.load(str(save_tiny_llama(tmp_path / "m", layers=1)))
    stream = Value("layers.0.mlp_residual", 0)
    graph.insert_after(stream, "Activation", "residual_act", attrs={"kind": "silu"})
    before = {k: materialize(v).clone() for k, v in graph.params.items()}
    with pytest.raises(NotRotatable, match="residual_act"):
        rotate_residual(graph)
    assert all(torch.equal(materialize(graph.params[k]), v) for k, v in before.items())  # nothing half-rotated
    with pytest.raises(PreconditionError, match="rotate=true"):
        QuantizePass(bits=4, rotate=True, calibration_samples=2, calibration_seq_len=16).run(graph, PassContext())


def test_constant_multipliers_in_the_stream_commute_with_the_rotation(tiny_model_dir):
    """Granite scales the embedding, each branch before its Add, and the logits: rotated, the logits stay."""
    graph = tokopt.load(tiny_model_dir("granite")[0])
    assert len(graph.nodes("Scale")) >= 3
    rotated = graph.copy()
    rotate_residual(rotated)
    ids = sample_ids(seq=24, vocab=graph.meta.vocab_size)
    assert torch.allclose(_logits(rotated, ids), _logits(graph, ids), atol=1e-5)


def test_a_post_norm_model_is_refused(tiny_model_dir):
    graph = tokopt.load(tiny_model_dir("olmo2")[0])  # post-norm: the Linears read the raw stream, not a norm
    with pytest.raises(NotRotatable, match="q_proj \\(Linear\\) reads the residual stream"):
        rotate_residual(graph)


def test_gptq_rotates_by_default_and_keeps_the_added_linear_in_float(tmp_path):
    graph = tokopt.load(str(save_tiny_llama(tmp_path / "m", tie_word_embeddings=True)))
    opts = dict(bits=4, calibration_samples=2, calibration_seq_len=32)
    result = QuantizePass(**opts).run(graph, PassContext())
    assert any("rotated the residual stream" in n for n in result.notes)
    q = result.graph
    assert not isinstance(q.params[q.node("final_norm.rotation").params["weight"]], QuantizedWeight)
    assert isinstance(q.params[q.node("lm_head").params["weight"]], QuantizedWeight)
    plain = QuantizePass(**opts, rotate=False).run(graph, PassContext()).graph
    assert "final_norm.rotation" not in plain.nx
    rtn = QuantizePass(bits=4, method="rtn").run(graph, PassContext())
    assert not any("rotated" in n for n in rtn.notes)


def test_a_tied_table_read_outside_the_norms_is_refused(tmp_path):
    """Rotated once, a tied lm_head reads the table through the rotation's matrix: rotating again would break it."""
    graph = tokopt.load(str(save_tiny_llama(tmp_path / "m", layers=1, tie_word_embeddings=True)))
    rotate_residual(graph)
    with pytest.raises(NotRotatable, match="lm_head reads"):
        rotate_residual(graph)
