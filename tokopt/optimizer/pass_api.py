"""The pass API: typed options, conditions required and ensured, declared effects, and ``run``.

A pass reads like a page: class attributes declare its name, options (with types,
defaults and docs), the conditions it needs (``requires``) and guarantees (``ensures``),
and which report metrics it promises to move; ``run`` returns the new graph and whether
it modified anything.  Options are validated when the pass is constructed, so a bad
pipeline fails before any expensive work; the pass manager checks every declaration
(:mod:`tokopt.optimizer.manager`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer.ir.weights import QuantizedWeight

if TYPE_CHECKING:
    import torch

    from tokopt.optimizer.ir.graph import Graph


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


def at_least(bound: float) -> Callable[[Any], str | None]:
    """An :class:`Option` check: the value must be ``>= bound`` (counts, sizes, steps, rates)."""
    return lambda value: None if value >= bound else f"must be >= {bound}"


def in_unit_interval(value: float) -> str | None:
    """An :class:`Option` check for fractions: the value must be in (0, 1]."""
    return None if 0 < value <= 1 else "must be in (0, 1]"


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


# -- conditions: the vocabulary of ``requires`` and ``ensures`` ----------------------------------
#: name -> (test on a graph and the context, what it means in an error message).  ``"!name"`` negates.
CONDITIONS: dict[str, Callable[[Graph, PassContext], bool]] = {
    "attention": lambda g, ctx: bool(g.nodes("Attention")),
    "moe": lambda g, ctx: bool(g.nodes("MoE")),
    "calibration": lambda g, ctx: bool(ctx.calibration_batches),
    "quantized": lambda g, ctx: any(isinstance(w, QuantizedWeight) for w in g.params.values()),
    "window": lambda g, ctx: any(n.attrs.get("window") for n in g.nodes("Attention")),
}
_MEANING = {
    "attention": "attention layers", "moe": "mixture-of-experts layers",
    "calibration": "calibration text (--calib-text FILE, or the default corpus)",
    "quantized": "quantized weights", "window": "sliding-window attention",
}


def parse_condition(text: str, owner: str) -> tuple[str, bool]:
    """``"moe"`` → ("moe", True), ``"!moe"`` → ("moe", False); an unknown name is the pass's bug."""
    want = not text.startswith("!")
    name = text.lstrip("!")
    if name not in CONDITIONS:
        raise PassOptionError(f"{owner}: declares condition {text!r}; known conditions: "
                              f"{', '.join(sorted(CONDITIONS))} (prefix ! to negate)")
    return name, want


def describe_condition(name: str, want: bool) -> str:
    return _MEANING.get(name, name) if want else f"no {_MEANING.get(name, name)}"


class PassResult:
    """What a pass returns: the new graph, whether it modified anything, and notes for the report.

    ``modified`` is checked by the pass manager against the graphs themselves.  ``changed``
    is its name in plugin API version 1 and is still accepted.  ``tables`` are named lists of
    JSON-ready rows the report keeps beside the stage (e.g. quantize's per-tensor sensitivities).
    """

    def __init__(self, graph: Graph, modified: bool | None = None, notes: list[str] | None = None, *,
                 changed: bool | None = None, tables: dict[str, list[dict]] | None = None) -> None:
        if modified is None and changed is None:
            raise TypeError("PassResult needs modified=True/False")
        self.graph = graph
        self.modified = bool(modified if modified is not None else changed)
        self.notes = list(notes or [])
        self.tables = dict(tables or {})

    @property
    def changed(self) -> bool:
        return self.modified


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

    def calibration(self, graph: Graph, count: int, seq_len: int, pass_name: str) -> list[torch.Tensor]:
        """Up to ``count`` (1, ``seq_len``) batches of calibration tokens — one policy for every pass.

        The text is the pipeline's calibration batches when it has any (re-cut, never longer
        than they are, so a pass may ask for shorter sequences than the pipeline calibrates
        with), else the project's default calibration text (standard-library docstrings
        disjoint from the evaluation text), so results stay reproducible offline.
        """
        import torch

        from tokopt.optimizer.corpus import default_calibration_text, tokenize, tokenizer_for

        if self.calibration_batches:
            ids = torch.cat([b.reshape(-1) for b in self.calibration_batches])
            seq_len = min(seq_len, min(b.shape[-1] for b in self.calibration_batches))
            source = "pipeline calibration batches"
        else:
            ids = tokenize(default_calibration_text(), tokenizer_for(graph), graph.meta.vocab_size)
            source = "default calibration text (stdlib docstrings)"
        n = min(count, len(ids) // seq_len)
        batches = [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(n)]
        self.log.info("%s: %d × %d calibration tokens from %s", pass_name, len(batches), seq_len, source)
        if not batches:
            raise PreconditionError(f"{pass_name}: the calibration text has {len(ids)} tokens, fewer than one "
                                    f"sequence of {seq_len}; give more calibration text or a shorter sequence length")
        return batches

    def capture_inputs(self, graph: Graph, nodes: set[str], batches: list[torch.Tensor] | None = None,
                       ) -> dict[str, list[torch.Tensor]]:
        """Inputs (first operand) of ``nodes`` for each calibration batch, in order."""
        from tokopt.optimizer.interpret import ReferenceExecutor

        executor = ReferenceExecutor(graph)
        out: dict[str, list[torch.Tensor]] = {n: [] for n in nodes}
        for batch in batches if batches is not None else self.calibration_batches:
            _, captured = executor.forward(batch, capture=nodes)
            for name, tensor in captured.items():
                out[name].append(tensor)
        return out


class Pass:
    """Base class of every pass (built-in or plugin).

    Subclasses set ``name``, ``summary``, ``options`` and implement :meth:`run`, which must
    not modify its input graph (copy it: ``graph.copy()`` is a cheap structural copy).
    ``requires`` and ``ensures`` name conditions of :data:`CONDITIONS` (``"!moe"``: none
    left) that must hold on the pass's input and will hold on its output; the manager
    checks both, and a pipeline whose later pass needs what an earlier one removes fails in
    ``--dry-run``.  ``moves`` lists the report metrics the pass promises to change (checked
    against the report's metric names); ``changes_numerics`` is False for pure layout passes.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()
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

    def whole_model(self) -> str | None:
        """Why this configuration needs every weight in float32 at once, or None when it streams.

        A model past the weight memory budget runs only passes that stream (read a weight when its
        node runs); the others are refused up front, before anything is measured, with this reason.
        """
        return None

    def preview(self, graph: Graph, ctx: PassContext) -> Graph | None:
        """The graph as :meth:`run` will leave it, as far as backends care (attributes, weight formats), cheaply.

        Lets a backend refuse a stage in ``--dry-run``, before any pass runs.  Weight *values* may
        be placeholders (meta tensors); ``None`` (the default) means "cannot tell before running":
        the stage is then checked as soon as it exists, still before it is measured.
        """
        return None

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
                "ensures": sorted(cls.ensures),
                "moves": list(cls.moves), "changes_numerics": cls.changes_numerics, "plugin": cls.plugin}


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ";".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)
