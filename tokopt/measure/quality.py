"""Quality on fixed evaluation tokens: perplexity, KL to the baseline, top-1 agreement.

Every stage of a pipeline is judged on the *same* token batches against the *same*
baseline distributions, so the deltas in a report are paired comparisons, not noise
between two samples.  Perplexity alone hides damage (a model can keep its perplexity
while changing which token it would pick), hence the mean KL(baseline ‖ stage) of
next-token distributions and the top-1 agreement beside it.  Long-context perplexity is
measured at a separate, longer length for passes that change what attention can see.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokopt.errors import CorpusError
from tokopt.optimizer.corpus import TextSource, default_eval_text, fixed_batches, tokenize, tokenizer_for

if TYPE_CHECKING:
    import torch

    from tokopt.optimizer.ir.graph import Graph
log = logging.getLogger(__name__)

Forward = Callable[["torch.Tensor"], "torch.Tensor"]  # ids (batch, seq) -> logits (batch, seq, vocab)


@dataclass(frozen=True)
class EvalConfig:
    """How much text is evaluated.  The defaults are the project's reference setup (8 × 512)."""

    sequences: int = 8
    seq_len: int = 512
    batch_size: int = 2
    long_context: int = 2048
    long_sequences: int = 2
    calib_sequences: int = 32  # GPTQ on SmolLM2: 13.78 -> 13.46 ppl from 8 to 32 sequences, prose 29.15 -> 28.65
    calib_seq_len: int = 512

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class EvalData:
    """Token batches for one model's tokenizer: evaluation, long-context evaluation, calibration."""

    tokens: torch.Tensor  # (sequences, seq_len)
    batch_size: int
    source: dict[str, Any]
    long_tokens: torch.Tensor | None = None  # (long_sequences, long_context), built on demand
    long_source_ids: torch.Tensor | None = field(default=None, repr=False)

    def batches(self) -> list[torch.Tensor]:
        return list(self.tokens.split(self.batch_size))


def build_eval_data(text: TextSource, config: EvalConfig, tokenizer, vocab_size: int,
                    with_long: bool = False) -> EvalData:
    """Fixed evaluation batches (and long-context ones when ``with_long``) for one tokenizer."""
    ids = tokenize(text, tokenizer, vocab_size)
    tokens = fixed_batches(ids, config.sequences, config.seq_len, f"evaluation text {text.name}")
    data = EvalData(tokens, config.batch_size, {**text.describe(), "tokens_available": int(ids.numel()),
                                               "sequences": config.sequences, "seq_len": config.seq_len})
    data.long_source_ids = ids
    if with_long:
        ensure_long(data, config)
    return data


def ensure_long(data: EvalData, config: EvalConfig) -> None:
    if data.long_tokens is None:
        assert data.long_source_ids is not None
        data.long_tokens = fixed_batches(data.long_source_ids, config.long_sequences, config.long_context,
                                         "long-context evaluation text")
        data.source["long_context"] = config.long_context
        data.source["long_sequences"] = config.long_sequences


def build_calibration(text: TextSource, config: EvalConfig, tokenizer, vocab_size: int,
                      ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Calibration batches, one (1, calib_seq_len) tensor per sequence, and their description.

    A text shorter than the sequences asked for gives as many whole sequences as it holds (the
    description says how many, and a warning is logged): calibration improves with text but runs
    with less, unlike evaluation, whose figures must compare.
    """
    ids = tokenize(text, tokenizer, vocab_size)
    count = min(config.calib_sequences, max(1, ids.numel() // config.calib_seq_len))
    if count < config.calib_sequences:
        log.warning("calibration text %s holds %d sequences of %d tokens, not %d: calibrating on those", text.name,
                    ids.numel() // config.calib_seq_len, config.calib_seq_len, config.calib_sequences)
    tokens = fixed_batches(ids, count, config.calib_seq_len, f"calibration text {text.name}")
    return list(tokens.split(1)), {**text.describe(), "tokens_available": int(ids.numel()),
                                   "sequences": count, "seq_len": config.calib_seq_len}


def _log_probs(forward: Forward, batch: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        logits = forward(batch)
        return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _nll(lp: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    targets = batch[:, 1:]
    nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(nll.double().sum()), targets.numel()


def perplexity(forward: Forward, batches: Iterable[torch.Tensor], progress: Callable[..., Any] | None = None) -> float:
    """exp(mean negative log-likelihood of each next token), over all batches."""
    total, count = 0.0, 0
    wrap = progress or (lambda it, **_: it)
    for batch in wrap(list(batches), desc="long-context ppl", unit="seq"):
        s, n = _nll(_log_probs(forward, batch), batch)
        total, count = total + s, count + n
    return math.exp(total / count)


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference ‖ other) of next-token distributions, from two logits tensors of one shape."""
    import torch

    lp, lq = torch.log_softmax(reference.float(), -1), torch.log_softmax(other.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def eval_tokens(graph: Graph, length: int, sequences: int = 1) -> torch.Tensor:
    """(sequences, length) tokens from the start of the default evaluation text (tests, benchmarks)."""
    ids = tokenize(default_eval_text(), tokenizer_for(graph), graph.meta.vocab_size)
    if len(ids) < length * sequences:
        raise CorpusError(f"the evaluation text has only {len(ids)} tokens, {length * sequences} requested")
    return ids[:length * sequences].reshape(sequences, length)


class QualityEvaluator:
    """Measures stages against the first forward it is given (the baseline).

    The baseline's log-probabilities are kept (float32; 8 × 512 tokens of a 49k vocabulary
    is ~0.8 GB) so every later stage needs one forward pass, not two.
    """

    def __init__(self, data: EvalData, progress: Callable[..., Any] | None = None) -> None:
        self.data = data
        self.progress = progress or (lambda it, **_: it)
        self._base_lp: list[torch.Tensor] | None = None
        self.base_ppl: float | None = None
        self.base_long_ppl: float | None = None

    def prime(self, log_probs: list[torch.Tensor], ppl: float, long_ppl: float | None = None) -> None:
        """Take a baseline measured elsewhere (same eval data): every ``measure`` then compares with it."""
        if len(log_probs) != len(list(self.data.batches())):
            raise ValueError("the shared baseline was measured on other eval batches")
        self._base_lp, self.base_ppl, self.base_long_ppl = list(log_probs), ppl, long_ppl

    def baseline_state(self) -> tuple[list[torch.Tensor], float, float | None]:
        """(log-probs per batch, ppl, long ppl) of the baseline this evaluator measured, to share."""
        assert self._base_lp is not None and self.base_ppl is not None, "measure the baseline first"
        return self._base_lp, self.base_ppl, self.base_long_ppl

    def measure(self, forward: Forward, long: bool = False, desc: str = "eval") -> dict[str, float]:

        baseline = self._base_lp is None
        stored: list[torch.Tensor] = []
        total_nll, count = 0.0, 0
        kl_sum, agree, positions = 0.0, 0, 0
        for i, batch in enumerate(self.progress(self.data.batches(), desc=desc, unit="batch")):
            lp = _log_probs(forward, batch)
            s, n = _nll(lp, batch)
            total_nll, count = total_nll + s, count + n
            if baseline:
                stored.append(lp)
                continue
            base = self._base_lp[i]
            kl_sum += float((base.exp() * (base - lp)).sum(-1).double().sum())
            agree += int((base.argmax(-1) == lp.argmax(-1)).sum())
            positions += lp.shape[0] * lp.shape[1]
            del lp
        ppl = math.exp(total_nll / count)
        if baseline:
            self._base_lp = stored
            self.base_ppl = ppl
            out = {"ppl": ppl, "ppl_delta_pct": 0.0, "kl": 0.0, "top1_agreement": 1.0}
        else:
            assert self.base_ppl is not None
            out = {"ppl": ppl, "ppl_delta_pct": 100.0 * (ppl / self.base_ppl - 1.0),
                   "kl": max(kl_sum / positions, 0.0), "top1_agreement": agree / positions}
        if long:
            out.update(self.measure_long(forward, desc=desc))
        return out

    def measure_long(self, forward: Forward, desc: str = "eval") -> dict[str, float]:
        assert self.data.long_tokens is not None, "call ensure_long() before a long-context measurement"
        ppl = perplexity(forward, self.data.long_tokens.split(1),
                         progress=lambda it, **kw: self.progress(it, **{**kw, "desc": f"{desc} (long)"}))
        if self.base_long_ppl is None:
            self.base_long_ppl = ppl
        return {"long_ppl": ppl, "long_ppl_delta_pct": 100.0 * (ppl / self.base_long_ppl - 1.0)}


__all__ = [
    "EvalConfig", "EvalData", "QualityEvaluator", "build_eval_data", "build_calibration", "ensure_long",
    "perplexity", "mean_kl", "eval_tokens",
]
