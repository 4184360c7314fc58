"""The pass manager: parse a pipeline, resolve and check it up front, then run it stage by stage.

A pipeline is written either on the command line::

    --passes "quantize:bits=8,group_size=64,gqa:num_kv_heads=1"

(a token containing ``:`` — or a bare known pass name — starts a new pass; ``key=val``
tokens set options of the current pass; list values use ``;``), or as a YAML/TOML recipe
with the same meaning::

    passes:
      - quantize: {bits: 8, group_size: 64}
      - name: gqa
        options: {num_kv_heads: 1}

Everything that can be checked without running a pass is checked first (unknown passes
and options, option values, preconditions against the model), so ``--dry-run`` answers in
seconds and a bad pipeline never wastes an evaluation.  Running a pass gives it a copy of
the graph, verifies what it returns (``verify(graph, stage=<pass>)``), and hands the new
graph to the caller's ``on_stage`` for measurement.  A crash names the pass and the plugin
that provides it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokopt.optimizer.errors import PassOptionError, PluginError, PreconditionError, TokoptError
from tokopt.optimizer.graph import Graph
from tokopt.optimizer.verify import verify
from tokopt.passes.base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
RECIPE_KEYS = ("version", "model", "backend", "passes", "eval", "speed", "gates")


class RecipeError(PassOptionError):
    """A recipe file or ``--passes`` string is malformed (exit code 2)."""


@dataclass
class PassSpec:
    """One pipeline entry as written: a pass name and its raw (unparsed) options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


# -- parsing ------------------------------------------------------------------------------------
def parse_passes(text: str | None, known: set[str] | None = None) -> list[PassSpec]:
    """Parse the ``--passes`` syntax into specs (names are checked later, when resolving)."""
    if known is None:
        from tokopt.passes.registry import known_pass_names

        known = set(known_pass_names())
    specs: list[PassSpec] = []
    for raw in (text or "").split(","):
        token = raw.strip()
        if not token:
            continue
        colon, equals = token.find(":"), token.find("=")
        if colon >= 0 and (equals < 0 or colon < equals):  # "name:" or "name:key=val"
            name, rest = token[:colon].strip(), token[colon + 1:].strip()
            if not name:
                raise RecipeError(f"--passes: {token!r} has no pass name before ':'")
            specs.append(PassSpec(name))
            if rest:
                _set_option(specs[-1], rest, token)
        elif equals >= 0:  # "key=val" for the current pass
            if not specs:
                raise RecipeError(f"--passes: option {token!r} comes before any pass name; "
                                  "write it as name:key=val")
            _set_option(specs[-1], token, token)
        elif token in known:  # a bare pass name
            specs.append(PassSpec(token))
        else:
            last = f"; if it is an option of {specs[-1].name}, write key=value" if specs else ""
            raise RecipeError(f"--passes: {token!r} is neither a known pass nor key=value{last}. "
                              f"Known passes: {', '.join(sorted(known)) or 'none'}")
    return specs


def _set_option(spec: PassSpec, text: str, token: str) -> None:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--passes: {token!r}: expected key=value after the pass name")
    if key in spec.options:
        raise RecipeError(f"--passes: {spec.name}: option {key} is given twice")
    spec.options[key] = value.strip()


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) recipe into a plain dictionary."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {p}: {exc}") from None
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml and toml raise their own error types
        raise RecipeError(f"recipe {p} is not valid {'TOML' if p.suffix.lower() == '.toml' else 'YAML'}: {exc}",
                          ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {p}: the top level must be a mapping with a 'passes' list")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(f"recipe {p}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(RECIPE_KEYS)}")
    if int(data.get("version", RECIPE_VERSION)) != RECIPE_VERSION:
        raise RecipeError(f"recipe {p}: version {data['version']} is not supported (this tokopt reads version "
                          f"{RECIPE_VERSION})")
    return data


def recipe_passes(entries: Any, where: str = "recipe") -> list[PassSpec]:
    """The ``passes`` list of a recipe: each entry ``{name:, options:}``, ``{name: {opts}}`` or ``"name:k=v"``."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise RecipeError(f"{where}: 'passes' must be a list")
    specs: list[PassSpec] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            specs.extend(parse_passes(entry))
        elif isinstance(entry, dict) and "name" in entry:
            extra = sorted(set(entry) - {"name", "options"})
            if extra:
                raise RecipeError(f"{where}: passes[{i}] has unknown key(s) {', '.join(extra)}; "
                                  "write {name: ..., options: {...}}")
            options = entry.get("options") or {}
            if not isinstance(options, dict):
                raise RecipeError(f"{where}: passes[{i}].options must be a mapping")
            specs.append(PassSpec(str(entry["name"]), dict(options)))
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            if options is not None and not isinstance(options, dict):
                raise RecipeError(f"{where}: passes[{i}]: options of {name} must be a mapping")
            specs.append(PassSpec(str(name), dict(options or {})))
        else:
            raise RecipeError(f"{where}: passes[{i}] must be 'name:key=val', {{name: {{options}}}} or "
                              "{name: ..., options: {...}}")
    return specs


# -- resolution and checks ----------------------------------------------------------------------
def resolve(specs: list[PassSpec]) -> list[Pass]:
    """Instantiate every pass (validating its options) before anything runs."""
    from tokopt.passes.registry import get_pass_class

    passes: list[Pass] = []
    for spec in specs:
        cls = get_pass_class(spec.name)
        plugin = getattr(cls, "plugin", "tokopt")
        passes.append(_guard(plugin, spec.name, "configuring", lambda cls=cls, spec=spec: cls(**spec.options)))
    return passes


def resolved_recipe(passes: list[Pass], **extra: Any) -> dict[str, Any]:
    """The recipe as it will run: every option explicit, with the plugin that provides each pass."""
    recipe: dict[str, Any] = {"version": RECIPE_VERSION}
    recipe.update({k: v for k, v in extra.items() if v is not None})
    recipe["passes"] = [{"name": p.name, "options": dict(p.opts), "plugin": p.plugin, "spec": p.spec()}
                        for p in passes]
    return recipe


def check_pipeline(passes: list[Pass], graph: Graph, ctx: PassContext) -> None:
    """Preconditions of every pass against the input graph (cheap; before any expensive work).

    A pass is checked against the imported model, not against what earlier passes will
    make of it: the declared requirements (attention, MoE, calibration text) are stable
    across the built-in passes, and each pass re-checks in ``run``.
    """
    has = {"attention": bool(graph.nodes("Attention")), "moe": bool(graph.nodes("MoE")),
           "calibration": bool(ctx.calibration_batches)}
    for p in passes:
        for need in sorted(p.requires):
            if need in has and not has[need]:
                what = {"attention": "attention layers", "moe": "mixture-of-experts layers",
                        "calibration": "calibration text (--calib-text FILE, or the default corpus)"}[need]
                raise PreconditionError(f"{p.spec()}: needs {what}, which {graph.meta.source or 'the model'} "
                                        "does not have")
        _guard(p.plugin, p.spec(), "checking", lambda p=p: p.check(graph, ctx))


def _guard(plugin: str, what: str, doing: str, fn: Callable[[], Any]) -> Any:
    """Run pass code; a crash becomes an error naming the pass and its plugin."""
    try:
        return fn()
    except TokoptError:
        raise
    except Exception as exc:
        if plugin and plugin != "tokopt":
            err = PluginError(f"pass {what!r} from plugin {plugin!r} crashed while {doing}: "
                              f"{type(exc).__name__}: {exc}")
            err.plugin = plugin  # type: ignore[attr-defined]
            raise err from exc
        if hasattr(exc, "add_note"):
            exc.add_note(f"tokopt: raised by the built-in pass {what!r} while {doing}")
        log.error("built-in pass %r crashed while %s: %s: %s", what, doing, type(exc).__name__, exc)
        raise


# -- running ------------------------------------------------------------------------------------
@dataclass
class StageResult:
    index: int
    name: str  # "baseline" or the pass spec
    graph: Graph
    pass_: Pass | None = None
    changed: bool | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)  # filled by the caller's on_stage
    extra: dict[str, Any] = field(default_factory=dict)


def run_pass(p: Pass, graph: Graph, ctx: PassContext, index: int) -> StageResult:
    """Run one pass on a copy of ``graph``, verify the result, and record it in the history."""
    import time

    spec = p.spec()
    t0 = time.perf_counter()
    result = _guard(p.plugin, spec, "running", lambda: p.run(graph.copy(), ctx))
    if not isinstance(result, PassResult) or not isinstance(getattr(result, "graph", None), Graph):
        problem = f"pass {spec!r} returned {type(result).__name__}, not a PassResult with a Graph"
        if p.plugin != "tokopt":
            raise PluginError(f"plugin {p.plugin!r}: {problem}")
        raise TypeError(problem)
    new = result.graph
    stage = f"pass {spec!r}" + (f" (plugin {p.plugin!r})" if p.plugin != "tokopt" else "")
    verify(new, stage=stage)
    if not new.history or new.history[-1] != spec:
        new.history.append(spec)
    notes = list(result.notes)
    if not result.changed:
        notes.append("no change")
    return StageResult(index, spec, new, p, bool(result.changed), notes, time.perf_counter() - t0)


def run_pipeline(passes: list[Pass], graph: Graph, ctx: PassContext,
                 on_stage: Callable[[StageResult, StageResult | None], None] | None = None) -> list[StageResult]:
    """Run ``passes`` in order; ``on_stage(stage, previous)`` measures each stage (baseline first)."""
    from tokopt.plugins import notify_stage_end, notify_stage_start

    stages = [StageResult(0, "baseline", graph)]
    notify_stage_start("baseline", 0, graph)
    if on_stage:
        on_stage(stages[0], None)
    notify_stage_end("baseline", 0, graph, stages[0].metrics, [])
    for i, p in enumerate(passes, start=1):
        current = stages[-1].graph
        notify_stage_start(p.spec(), i, current)
        log.info("stage %d: %s", i, p.spec())
        stage = run_pass(p, current, ctx, i)
        stages.append(stage)
        if on_stage:
            on_stage(stage, stages[-2])
        notify_stage_end(stage.name, i, stage.graph, stage.metrics, stage.notes)
    return stages


class Pipeline:
    """A resolved, ordered list of configured passes — the Python face of ``--passes``.

    ``Pipeline.parse("quantize:bits=8").run(graph)`` runs it without measurement;
    :func:`tokopt.optimize` is the measured, reported, lowered version.
    """

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = list(passes)

    @classmethod
    def parse(cls, text: str | None) -> Pipeline:
        return cls(resolve(parse_passes(text)))

    @classmethod
    def from_recipe(cls, path: str | Path) -> Pipeline:
        return cls(resolve(recipe_passes(load_recipe(path).get("passes"), str(path))))

    def specs(self) -> list[str]:
        return [p.spec() for p in self.passes]

    def check(self, graph: Graph, ctx: PassContext | None = None) -> None:
        check_pipeline(self.passes, graph, ctx or PassContext())

    def run(self, graph: Graph, ctx: PassContext | None = None,
            on_stage: Callable[[StageResult, StageResult | None], None] | None = None) -> Graph:
        """Check, then run every pass (verified after each); returns the final graph."""
        ctx = ctx or PassContext(reference_graph=graph)
        self.check(graph, ctx)
        return run_pipeline(self.passes, graph, ctx, on_stage)[-1].graph

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(self.specs()) or 'empty'})"


__all__ = [
    "Pipeline", "PassSpec", "RecipeError", "parse_passes", "load_recipe", "recipe_passes", "resolve", "resolved_recipe",
    "check_pipeline", "run_pass", "run_pipeline", "StageResult", "RECIPE_VERSION",
]
