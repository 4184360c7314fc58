"""The onnxruntime artifact's sliding window + sinks is a bounded cache for real: a ring of
``sinks + window`` slots whose measured memory stays flat, with the reference's logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")

import tokopt  # noqa: E402
from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend  # noqa: E402
from tokopt.backends.parity import check_parity, decode_steps_for  # noqa: E402
from tokopt.optimizer.interpret import ReferenceExecutor  # noqa: E402

WINDOW, SINKS = 8, 2


@pytest.fixture(scope="module")
def windowed(tiny_model_dir):
    graph = tokopt.load(str(tiny_model_dir("llama")[0]))
    for node in graph.nodes("Attention"):
        node.attrs["window"], node.attrs["sinks"] = WINDOW, SINKS
    return graph


@pytest.fixture(scope="module")
def session(windowed, tmp_path_factory):
    out = tmp_path_factory.mktemp("ring") / "art"
    OnnxRuntimeBackend().lower(windowed, out)
    return OnnxRuntimeBackend().load(out, threads=1)


def _ids(vocab: int, seq: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_generation_past_three_windows_flat_kv_and_parity(windowed, session):
    """40 single-token steps after a 5-token prompt (45 > 3 x 10 slots): logits match step by step,
    and from the moment the ring is full the cache's measured bytes never change."""
    ref = ReferenceExecutor(windowed)
    rc, oc = ref.new_cache(), session.new_cache(1)
    step = _ids(windowed.meta.vocab_size, 5)
    sizes = []
    for _ in range(40):
        expected, got = ref.forward(step, rc), session.forward(step, oc)
        assert (expected - got).abs().max() <= 1e-3
        sizes.append((oc.seen, session.kv_nbytes(oc)))
        step = expected[:, -1:].argmax(-1)
    full = [n for seen, n in sizes if seen >= SINKS + WINDOW]
    layers = len(windowed.nodes("Attention"))
    a = windowed.nodes("Attention")[0].attrs
    assert set(full) == {layers * 2 * a["num_kv_heads"] * (SINKS + WINDOW) * a["head_dim"] * 4}
    assert sizes[0][1] < full[0]  # grows until the ring is full
    prompt = _ids(windowed.meta.vocab_size, 5, seed=1)
    assert torch.equal(session.generate(prompt, 3 * (SINKS + WINDOW)), ref.generate(prompt, 3 * (SINKS + WINDOW)))


@pytest.mark.parametrize("chunks", [(5, 8, 1, 12, 1, 1), (20, 3, 1)])
def test_chunks_that_overflow_the_ring(windowed, session, chunks):
    """A multi-token step that evicts keys its own first queries still need (batch 2)."""
    ids = _ids(windowed.meta.vocab_size, sum(chunks), batch=2, seed=2)
    ref = ReferenceExecutor(windowed)
    rc, oc, start = ref.new_cache(), session.new_cache(2), 0
    for n in chunks:
        chunk = ids[:, start:start + n]
        assert (ref.forward(chunk, rc) - session.forward(chunk, oc)).abs().max() <= 1e-3
        start += n


def test_parity_wraps_the_ring(windowed, session):
    """The lowering's parity check runs past a full turn of the ring; a graph without a window stays cheap."""
    report = check_parity(windowed, session, tokens=_ids(windowed.meta.vocab_size, 6, batch=2))
    steps = decode_steps_for(windowed, 6, 4)
    assert 6 + steps >= SINKS + 2 * WINDOW + 4 and report.positions == 2 * (6 + steps)
    plain = windowed.copy()
    for node in plain.nodes("Attention"):
        node.attrs["window"], node.attrs["sinks"] = None, 0
    assert decode_steps_for(plain, 6, 4) == 4


def test_capabilities_claim_the_bounded_window():
    caps = OnnxRuntimeBackend().capabilities()
    assert caps.window and caps.sinks and caps.weight_per_channel
