"""Logits parity between a backend's session and the reference executor.

Run after lowering, before an artifact is shipped: the same tokens go through both (a
batched prefill, then greedy decode steps fed the reference's choices so both sides see
identical inputs), and the logits must agree — fp32 graphs to ``atol`` in max absolute
difference, graphs holding quantized weights (identical codes on both sides, so only the
kernels' arithmetic differs) to ``min_top1`` next-token agreement.  A mismatch raises
:class:`~tokopt.optimizer.errors.ParityError`: nothing wrong is shipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tokopt.optimizer.errors import ParityError
from tokopt.optimizer.graph import Graph
from tokopt.optimizer.weights import QuantizedWeight

log = logging.getLogger(__name__)


@dataclass
class ParityReport:
    max_abs_diff: float
    top1_agreement: float
    positions: int
    quantized: bool
    passed: bool
    criterion: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def is_quantized(graph: Graph) -> bool:
    """Quantized weights, or run-time quantized activations: rounding makes logits discontinuous, so a
    float-level difference upstream may flip a code and the check falls back to top-1 agreement."""
    return any(isinstance(w, QuantizedWeight) for w in graph.params.values()) or any(
        n.attrs.get("act_quant") is not None for n in graph.nodes("Linear"))


def sample_tokens(graph: Graph, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Deterministic tokens for the check: calibration text when the model has a tokenizer.

    Real text matters for quantized graphs: on random ids the next-token distribution is
    flat and near-ties make top-1 agreement a coin toss.  Models without a tokenizer (tiny
    test models) get seeded random ids.
    """
    try:
        from tokopt.optimizer.corpus import default_calibration_text, fixed_batches, tokenize, tokenizer_for

        tokenizer = tokenizer_for(graph)
        if tokenizer is not None:
            ids = tokenize(default_calibration_text(), tokenizer, graph.meta.vocab_size)
            return fixed_batches(ids, batch, length, "parity check")
    except Exception as exc:  # noqa: BLE001 - any failure to get text falls back to ids, never blocks lowering
        log.debug("parity check uses random ids: %s", exc)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, graph.meta.vocab_size, (batch, length), generator=gen)


def check_parity(graph: Graph, session: Any, *, tokens: torch.Tensor | None = None, decode_steps: int = 4,
                 atol: float = 1e-3, min_top1: float = 0.99, quantized: bool | None = None,
                 reference: Any = None, raise_on_failure: bool = True, label: str = "backend") -> ParityReport:
    """Compare ``session`` (any object with new_cache/forward) with the reference executor on ``graph``."""
    from tokopt.backends.torch import ReferenceExecutor

    ref = reference or ReferenceExecutor(graph)
    quantized = is_quantized(graph) if quantized is None else quantized
    if tokens is None:
        tokens = sample_tokens(graph, 2, 64 if quantized else 16)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    ref_cache, cache = ref.new_cache(), _new_cache(session, tokens.shape[0])
    step = tokens
    max_diff, agree, total = 0.0, 0, 0
    for _ in range(decode_steps + 1):
        expected = ref.forward(step, ref_cache).float()
        got = session.forward(step, cache).float()
        if got.shape != expected.shape:
            raise ParityError(f"{label}: logits shape {tuple(got.shape)} != reference {tuple(expected.shape)}")
        max_diff = max(max_diff, float((got - expected).abs().max()))
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += expected.shape[0] * expected.shape[1]
        step = expected[:, -1:].argmax(-1)
    top1 = agree / total
    if quantized:
        passed, criterion = top1 >= min_top1, f"top-1 agreement >= {min_top1:.0%}"
    else:
        passed, criterion = max_diff <= atol, f"max |logit diff| <= {atol:g}"
    report = ParityReport(max_diff, top1, total, quantized, passed, criterion)
    log.info("parity %s: max diff %.3g, top-1 %.2f%% over %d positions", label, max_diff, 100 * top1, total)
    if not passed and raise_on_failure:
        raise ParityError(
            f"{label} disagrees with the reference executor: max |logit diff| {max_diff:.3g}, top-1 agreement "
            f"{top1:.2%} over {total} positions (required: {criterion}); the artifact was not written")
    return report


def _new_cache(session: Any, batch: int) -> Any:
    try:
        return session.new_cache(batch)
    except TypeError:  # sessions whose caches size themselves on first use
        return session.new_cache()
