"""Perplexity and next-token divergence of a graph on fixed tokens, via the reference executor.

The passes' tests and benchmarks measure with these so a figure in a note can be
re-run with one call; the pipeline's report computes its own with the same definition
(mean next-token negative log-likelihood, exponentiated).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokopt.optimizer.graph import Graph


def logits_of(graph: Graph, ids: torch.Tensor) -> torch.Tensor:
    from tokopt.backends.torch import ReferenceExecutor

    return ReferenceExecutor(graph).forward(ids)


def perplexity(graph: Graph, ids: torch.Tensor, logits: torch.Tensor | None = None) -> float:
    """exp(mean NLL of ids[:, 1:] given the prefix), one full-context forward pass."""
    logits = logits_of(graph, ids) if logits is None else logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference ‖ other) of next-token distributions."""
    lp, lq = F.log_softmax(reference.float(), -1), F.log_softmax(other.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())
