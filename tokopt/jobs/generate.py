"""Text in, text out: tokenizer + an executor's greedy decoding.

Kept apart from the executor so every backend's session generates through the same
tokenizer handling (chat template off by default: the prompt is used verbatim).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokopt.errors import ModelSourceError
from tokopt.optimizer.corpus import load_tokenizer
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.graph import Graph


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str


def generate_text(graph: Graph, prompt: str, max_new_tokens: int = 32, executor=None) -> Generation:
    """Greedy continuation of ``prompt``; stops at the model's EOS token."""
    tokenizer = load_tokenizer(graph)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ModelSourceError("the prompt tokenizes to no tokens; give a non-empty --prompt")
    executor = executor or ReferenceExecutor(graph)
    new = executor.generate(ids, max_new_tokens, eos_token_id=graph.meta.eos_token_id)[0]
    return Generation(ids[0].tolist(), new.tolist(), tokenizer.decode(new, skip_special_tokens=True))

