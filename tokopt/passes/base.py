"""The pass API: typed options, preconditions, declared effects, and ``run``.

A pass reads like a page: class attributes declare its name, options (with types,
defaults and docs), what it needs and which metrics it promises to move; ``run``
returns the new graph and whether anything changed.  Options are validated when the
pass is constructed, so a bad pipeline fails before any expensive work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tokopt.optimizer.errors import PassOptionError

if TYPE_CHECKING:
    import torch

    from tokopt.optimizer.graph import Graph


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def parse_int_list(text: str) -> list[int]:
    """``"0;2;5-7"`` → ``[0, 2, 5, 6, 7]`` (``;`` separates: ``,`` separates options)."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(";"):
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def parse_str_list(text: str) -> list[str]:
    return [p for p in str(text).split(";") if p]


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "bool": parse_bool,
    "int_list": parse_int_list, "str_list": parse_str_list,
}


@dataclass(frozen=True)
class Option:
    """One pass option.  ``kind`` is int, float, str, bool, int_list or str_list.

    ``choices`` restricts values; ``check`` returns an error message (or None) for values
    that parse but make no sense (e.g. a negative window).  ``None`` is accepted when the
    default is ``None`` ("not set").
    """

    name: str
    kind: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None

    def coerce(self, value: Any, pass_name: str) -> Any:
        if value is None or (isinstance(value, str) and value.lower() == "none" and self.default is None):
            if self.default is None:
                return None
            raise PassOptionError(f"{pass_name}: option {self.name} needs a value ({self.describe()})")
        try:
            if isinstance(value, str) or self.kind in ("int_list", "str_list") and not isinstance(value, list):
                value = _PARSERS[self.kind](str(value))
            elif self.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif self.kind == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            elif self.kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{value!r} is not a boolean")
        except ValueError as exc:
            raise PassOptionError(f"{pass_name}: bad value for {self.name}: {exc} ({self.describe()})") from None
        expected = {"int": int, "float": float, "str": str, "bool": bool, "int_list": list, "str_list": list}[self.kind]
        if not isinstance(value, expected) or (self.kind == "int" and isinstance(value, bool)):
            raise PassOptionError(f"{pass_name}: {self.name}={value!r} is not {self.kind} ({self.describe()})")
        if self.choices is not None and value not in self.choices:
            raise PassOptionError(
                f"{pass_name}: {self.name}={value!r} is not allowed; choose one of {', '.join(map(str, self.choices))}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise PassOptionError(f"{pass_name}: {self.name}={value!r}: {problem}")
        return value

    def describe(self) -> str:
        choice = f", one of {'/'.join(map(str, self.choices))}" if self.choices else ""
        return f"{self.name}: {self.kind}{choice}, default {self.default!r}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.kind, "default": self.default, "doc": self.doc,
                "choices": list(self.choices) if self.choices else None}


@dataclass
class PassResult:
    graph: Graph
    changed: bool
    notes: list[str] = field(default_factory=list)  # what the pass did, for the report


class PassContext:
    """What a pass may use: calibration text, activation capture, a seeded RNG, progress.

    ``calibration_batches`` are token-id tensors (batch, seq) from calibration text that
    never overlaps the evaluation text.  ``capture_inputs`` runs the reference executor
    and returns the inputs of the named nodes, so calibration stays layer-local.
    """

    def __init__(self, calibration_batches: list[torch.Tensor] | None = None, seed: int = 0,
                 backend: str | None = None, progress: Callable[..., Any] | None = None,
                 reference_graph: Graph | None = None) -> None:
        import torch

        self.calibration_batches = calibration_batches or []
        self.seed = seed
        self.rng = torch.Generator().manual_seed(seed)
        self.backend = backend
        self.reference_graph = reference_graph  # the graph before the pipeline (for distillation)
        self.progress = progress or (lambda iterable, **_: iterable)
        self.log = logging.getLogger("tokopt.pass")

    def capture_inputs(self, graph: Graph, nodes: set[str], batches: list[torch.Tensor] | None = None,
                       ) -> dict[str, list[torch.Tensor]]:
        """Inputs (first operand) of ``nodes`` for each calibration batch, in order."""
        from tokopt.backends.torch import ReferenceExecutor

        executor = ReferenceExecutor(graph)
        out: dict[str, list[torch.Tensor]] = {n: [] for n in nodes}
        for batch in batches if batches is not None else self.calibration_batches:
            _, captured = executor.forward(batch, capture=nodes)
            for name, tensor in captured.items():
                out[name].append(tensor)
        return out


class Pass:
    """Base class of every pass (built-in or plugin).

    Subclasses set ``name``, ``summary``, ``options`` and implement :meth:`run`.
    ``requires`` may name ``calibration`` (needs calibration text), ``attention`` or
    ``moe`` (the graph must have such nodes).  ``moves`` lists the report metrics the
    pass promises to change; ``changes_numerics`` is False for pure layout passes.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    requires: ClassVar[frozenset[str]] = frozenset()
    moves: ClassVar[tuple[str, ...]] = ()
    changes_numerics: ClassVar[bool] = True
    plugin: str = "tokopt"  # set by the registry to the distribution that provides it

    def __init__(self, **options: Any) -> None:
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            valid = ", ".join(o.describe() for o in self.options) or "(this pass takes no options)"
            raise PassOptionError(f"{self.name}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
        self.opts: dict[str, Any] = {
            name: opt.coerce(options[name], self.name) if name in options else opt.default
            for name, opt in known.items()
        }
        self.validate()

    def validate(self) -> None:
        """Cross-option checks (raise :class:`PassOptionError`); called after coercion."""

    def check(self, graph: Graph, ctx: PassContext) -> None:
        """Preconditions against the model (raise :class:`PreconditionError`); cheap."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def spec(self) -> str:
        """The canonical ``name:key=val,…`` form of this configured pass."""
        parts = [f"{k}={_fmt(v)}" for k, v in self.opts.items() if v != self._default(k)]
        return self.name + (":" + ",".join(parts) if parts else "")

    def _default(self, key: str) -> Any:
        return next(o.default for o in self.options if o.name == key)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"name": cls.name, "summary": cls.summary, "doc": (cls.__doc__ or "").strip(),
                "options": [o.as_dict() for o in cls.options], "requires": sorted(cls.requires),
                "moves": list(cls.moves), "changes_numerics": cls.changes_numerics, "plugin": cls.plugin}


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ";".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)
