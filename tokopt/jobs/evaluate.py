"""The job behind ``tokopt eval``: perplexity of a model or artifact on the report's evaluation batches."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tokopt.jobs.common import config_of, make_progress
from tokopt.jobs.targets import open_target
from tokopt.measure.quality import EvalConfig, QualityEvaluator, build_eval_data
from tokopt.optimizer.ir.graph import Graph


def evaluate(model: str | Path | Graph, eval_text: str | Path | None = None, *,
             eval_options: dict[str, Any] | None = None, long: bool = False,
             progress: bool | None = None) -> dict[str, Any]:
    """Perplexity of a model or artifact on the evaluation text (the same batches ``optimize`` uses)."""
    from tokopt.optimizer.corpus import default_eval_text, file_text

    config: EvalConfig = config_of(EvalConfig, None, eval_options, "eval options")
    target = open_target(model)
    text = file_text(eval_text) if eval_text else default_eval_text()
    data = build_eval_data(text, config, target.tokenizer, target.vocab_size, with_long=long)
    evaluator = QualityEvaluator(data, make_progress(progress))
    t0 = time.perf_counter()
    quality = evaluator.measure(target.session.forward, long=long)
    result = {"model": target.label, "ppl": quality["ppl"], "tokens": int(data.tokens.numel()),
              "eval": data.source, "seconds": round(time.perf_counter() - t0, 3)}
    if long:
        result["long_ppl"] = quality["long_ppl"]
    if target.artifact is not None:
        result["backend"] = target.artifact["backend"]
    return result
