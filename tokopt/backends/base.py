"""The backend API: lower a graph to a self-contained artifact directory, load it as a session.

A backend says what it can express (``capabilities``) and refuses the rest in
:meth:`Backend.check` — it never silently drops an attribute.  A :class:`Session` has
the same interface as the reference executor (``new_cache``/``forward``/``generate``),
so parity checks and benchmarks treat every backend alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import torch

    from tokopt.optimizer.graph import Graph


class Session(Protocol):
    def new_cache(self) -> Any: ...

    def forward(self, input_ids: torch.Tensor, cache: Any = None) -> torch.Tensor: ...

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor: ...


@dataclass
class Artifact:
    path: Path
    backend: str
    files: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Base class of every backend (built-in or plugin)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    plugin: str = "tokopt"

    def availability(self) -> tuple[bool, str]:
        """(usable here?, why not / what it runs on)."""
        return True, "available"

    def capabilities(self) -> dict[str, Any]:
        """What the backend can express, e.g. {"window": True, "sinks": False, "kv_dtypes": [...]}."""
        return {}

    def check(self, graph: Graph) -> None:
        """Raise :class:`~tokopt.optimizer.errors.BackendRefusalError` for what it cannot express."""

    def lower(self, graph: Graph, out_dir: Path) -> Artifact:
        raise NotImplementedError

    def load(self, path: Path, **options: Any) -> Session:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        ok, why = self.availability()
        return {"name": self.name, "summary": self.summary, "available": ok, "reason": why,
                "capabilities": self.capabilities(), "plugin": self.plugin}


def greedy_decode(forward: Callable[[torch.Tensor, Any], torch.Tensor], cache: Any, input_ids: torch.Tensor,
                  max_new_tokens: int, eos_token_id: int | list[int] | None = None) -> torch.Tensor:
    """Greedy decoding shared by every session: prefill, then one token per step.

    Stops when every row has produced an EOS token or after ``max_new_tokens``; never runs
    a forward whose logits would be thrown away.  Returns (batch, new_tokens) ids.
    """
    import torch

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
