"""Greedy decoding, shared by the reference executor and every backend's session.

One loop for all of them, so that "the same tokens as the reference" compares sessions, never two
decoding loops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def greedy_decode(forward: Callable[[torch.Tensor, Any], torch.Tensor], cache: Any, input_ids: torch.Tensor,
                  max_new_tokens: int, eos_token_id: int | list[int] | None = None) -> torch.Tensor:
    """Greedy decoding shared by every session: prefill, then one token per step.

    Stops when every row has produced an EOS token or after ``max_new_tokens``; never runs
    a forward whose logits would be thrown away.  Returns (batch, new_tokens) ids.
    """
    eos = sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or []))
    logits = forward(input_ids, cache)
    out: list[torch.Tensor] = []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        if eos:
            done |= torch.isin(nxt, torch.tensor(eos, dtype=nxt.dtype))
        if bool(done.all()) or len(out) == max_new_tokens:
            break
        logits = forward(nxt[:, None], cache)
    return torch.stack(out, dim=1) if out else input_ids.new_zeros((input_ids.shape[0], 0))


class GreedyGeneration:
    """``generate`` for any session with ``forward(ids, cache)`` and ``new_cache(batch)``: one loop for all."""

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor:
        """Greedy decoding with the session's KV cache; returns (batch, new_tokens) ids."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        with torch.inference_mode():
            return greedy_decode(self.forward, self.new_cache(input_ids.shape[0]),  # type: ignore[attr-defined]
                                 input_ids, max_new_tokens, eos_token_id)
