"""Calibration (and evaluation) token batches for the attention passes.

The pipeline hands passes calibration batches (``PassContext.calibration_batches``) cut
from text that never overlaps the evaluation text.  When a pass runs outside a pipeline
with none, it reads the project's default calibration text itself
(:func:`tokopt.optimizer.corpus.default_calibration_text`: standard-library docstrings
disjoint from the evaluation modules), so results stay reproducible offline.
"""

from __future__ import annotations

import logging

import torch

from tokopt.optimizer.corpus import default_calibration_text, default_eval_text, tokenize, tokenizer_for
from tokopt.optimizer.errors import PreconditionError
from tokopt.optimizer.graph import Graph

log = logging.getLogger(__name__)


def split_batches(ids: torch.Tensor, seq_len: int, count: int) -> list[torch.Tensor]:
    n = min(count, len(ids) // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(n)]


def calibration_batches(graph: Graph, ctx, count: int, seq_len: int, pass_name: str) -> list[torch.Tensor]:
    """Up to ``count`` (1, ``seq_len``) batches: the context's if it has any, else the default calibration text.

    The context's batches are re-cut to ``seq_len`` tokens (never longer than they are) so
    a pass can ask for shorter sequences (healing) than the pipeline calibrates with.
    """
    if ctx is not None and ctx.calibration_batches:
        ids = torch.cat([b.reshape(-1) for b in ctx.calibration_batches])
        seq_len = min(seq_len, min(b.shape[-1] for b in ctx.calibration_batches))
        source = "pipeline calibration batches"
    else:
        ids = tokenize(default_calibration_text(), tokenizer_for(graph), graph.meta.vocab_size)
        source = "default calibration text (stdlib docstrings)"
    batches = split_batches(ids, seq_len, count)
    log.info("%s: %d × %d calibration tokens from %s", pass_name, len(batches), seq_len, source)
    if not batches:
        raise PreconditionError(f"{pass_name}: the calibration text has {len(ids)} tokens, fewer than one "
                                f"sequence of {seq_len}; give more calibration text or a shorter sequence length")
    return batches


def eval_tokens(graph: Graph, length: int, sequences: int = 1) -> torch.Tensor:
    """(sequences, length) tokens from the start of the default evaluation text (tests, benchmarks)."""
    ids = tokenize(default_eval_text(), tokenizer_for(graph), graph.meta.vocab_size)
    if len(ids) < length * sequences:
        raise PreconditionError(f"the evaluation text has only {len(ids)} tokens, {length * sequences} requested")
    return ids[:length * sequences].reshape(sequences, length)
