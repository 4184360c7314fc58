"""The backend API: lower a graph to a self-contained artifact directory, load it as a session.

A backend says what it can express (``capabilities``) and refuses the rest in
:meth:`Backend.check` — it never silently drops an attribute.  A :class:`Session` has
the same interface as the reference executor (``new_cache``/``forward``/``generate``),
so parity checks and benchmarks treat every backend alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tokopt.backends.capabilities import Capabilities, check_capabilities

if TYPE_CHECKING:
    import torch

    from tokopt.optimizer.ir.graph import Graph


class Session(Protocol):
    def new_cache(self, batch: int | None = None) -> Any: ...

    def kv_nbytes(self, cache: Any) -> int:
        """Bytes of KV-cache memory ``cache`` holds allocated right now (measured, not computed from the IR)."""
        ...

    def forward(self, input_ids: torch.Tensor, cache: Any = None) -> torch.Tensor: ...

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor: ...


def new_cache(session: Any, batch: int, length: int | None = None) -> Any:
    """A cache for ``batch`` sequences from any session: a plugin's may size its caches on first use
    and take no batch.  ``length``: the tokens the caller will run, for a session that reserves its cache
    up front (onnxruntime's shared buffer; a 7B's 256-slot first block is 0.25 GiB per sequence) —
    a session that takes no length sizes the cache itself."""
    if length is not None:
        try:
            return session.new_cache(batch, length=length)
        except TypeError:
            pass
    try:
        return session.new_cache(batch)
    except TypeError:
        return session.new_cache()


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
    #: ``optimize`` measures a lowered stage's quality on this backend's session of the artifact, in process,
    #: rather than on the reference executor: for runtimes whose kernels follow the IR's definition only to
    #: float rounding where a rounding can flip (run-time int8 activations: ~1 logit apart over a whole model),
    #: so the report's perplexity is the artifact's.  Off for sessions costly to open for long prompts.
    quality_on_artifact: ClassVar[bool] = False

    def availability(self) -> tuple[bool, str]:
        """(usable here?, why not / what it runs on)."""
        return True, "available"

    def capabilities(self) -> Capabilities:
        """What the backend honours, attribute by attribute (the default: float models, nothing more)."""
        return Capabilities()

    def check(self, graph: Graph) -> None:
        """Raise :class:`~tokopt.errors.BackendRefusalError` naming every node and attribute it cannot honour.

        The default holds ``graph`` against :meth:`capabilities`; a backend adds what only it knows.
        """
        check_capabilities(graph, self.capabilities(), self.name)

    def lower(self, graph: Graph, out_dir: Path) -> Artifact:
        raise NotImplementedError

    def load(self, path: Path, **options: Any) -> Session:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        ok, why = self.availability()
        return {"name": self.name, "summary": self.summary, "available": ok, "reason": why,
                "capabilities": self.capabilities().as_dict(), "plugin": self.plugin}
