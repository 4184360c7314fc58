"""The pass manager: requires → run → verify → ensures for every pass, with the contract checked.

A pass declares what it needs (``requires``) and what holds after it (``ensures``), in the
vocabulary of :data:`tokopt.optimizer.pass_api.CONDITIONS`.  The manager does not trust
either declaration, nor the ``modified`` flag a pass reports:

- :func:`check_pipeline` walks the pipeline *symbolically* before any expensive work: the
  input graph's conditions are evaluated, each pass's ``requires`` is checked against the
  conditions it will actually receive (its ``ensures`` are applied for the passes after
  it), so a pass needing what an earlier pass removes fails in ``--dry-run``;
- :func:`run_pass` checks ``requires`` on the real input, runs the pass, verifies the graph,
  checks ``ensures`` on the real output, and compares fingerprints of input and output: a
  pass that reports ``modified=False`` but changed the graph, that mutated its input, or that
  declares ``changes_numerics=False`` and moves the logits (on a cached prefill + decode),
  fails with a :class:`~tokopt.errors.PassContractError` naming the pass and its plugin.

A crash inside pass code names the pass and the plugin that provides it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tokopt.errors import PassContractError, PluginError, PreconditionError, TokoptError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.verify import verify
from tokopt.optimizer.ir.weights import LazyTensor, QuantizedWeight
from tokopt.optimizer.pass_api import CONDITIONS, Pass, PassContext, PassResult, describe_condition, parse_condition

log = logging.getLogger(__name__)


# -- symbolic check (dry run) -------------------------------------------------------------------
def conditions_of(graph: Graph, ctx: PassContext) -> dict[str, bool]:
    """Every condition of :data:`CONDITIONS`, evaluated on ``graph`` (and ``ctx``)."""
    return {name: bool(test(graph, ctx)) for name, test in CONDITIONS.items()}


def check_pipeline(passes: list[Pass], graph: Graph, ctx: PassContext) -> None:
    """Each pass's ``requires`` against what it will receive, and its own ``check``; cheap, before any work.

    Only the first pass sees ``graph`` itself: later passes are held against the conditions
    the earlier passes declare they ensure (what a pass does not declare is assumed kept).
    ``check`` (a pass's own precondition code) runs against the input graph for every pass.
    """
    facts = conditions_of(graph, ctx)
    after = ""
    for p in passes:
        _check_requires(p, facts, after or f"{graph.meta.source or 'the model'}")
        guard_pass(p.plugin, p.spec(), "checking", lambda p=p: p.check(graph, ctx))
        for cond in p.ensures:
            name, value = parse_condition(cond, p.spec())
            facts[name] = value
        after = f"the graph after {p.spec()!r}"


def _check_requires(p: Pass, facts: dict[str, bool], where: str) -> None:
    for cond in sorted(p.requires):
        name, want = parse_condition(cond, p.spec())
        if facts[name] != want:
            who = f" (plugin {p.plugin!r})" if p.plugin != "tokopt" else ""
            raise PreconditionError(f"{p.spec()}{who}: needs {describe_condition(name, want)}, which {where} "
                                    "does not have")


def guard_pass(plugin: str, what: str, doing: str, fn: Callable[[], Any]) -> Any:
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


# -- fingerprints: did a pass change the graph? --------------------------------------------------
def _tensor_key(t: torch.Tensor) -> tuple:
    """Storage identity plus torch's in-place version counter: cheap, and an in-place edit shows.

    A tensor made under ``torch.inference_mode`` has no version counter (``t._version`` raises
    ``RuntimeError: Inference tensors do not track version counter``), and passes make such
    tensors: GPTQ quantizes inside the calibration runner's ``inference_mode`` (``quantize:bits=4``
    crashed here after the pass had run).  Outside inference mode such a tensor cannot be edited
    in place at all, so its storage identity alone stands for it.
    """
    version = -1 if t.is_inference() else t._version
    return (t.data_ptr(), version, tuple(t.shape), str(t.dtype))


def _weight_key(w: Any) -> tuple:
    if isinstance(w, torch.Tensor):
        return _tensor_key(w)
    if isinstance(w, QuantizedWeight):
        return ("q", *(_tensor_key(t) if isinstance(t, torch.Tensor) else repr(t) for t in vars(w).values()))
    if isinstance(w, LazyTensor):
        return ("lazy", id(w))
    return ("other", id(w))


def fingerprint(graph: Graph) -> str:
    """A digest of everything a pass could change: nodes, attributes, edges, outputs, parameters, meta.

    Tensors count by storage and version, not by content, so this costs microseconds per
    parameter even for large models.
    """
    h = hashlib.sha256()
    for node in sorted(graph.nodes(), key=lambda n: n.name):
        h.update(repr((node.name, node.op, sorted(node.attrs.items(), key=str), sorted(node.params.items()),
                       [repr(o) for o in node.outputs])).encode())
    h.update(repr(sorted((s, d, sorted(data.items())) for s, d, data in graph.nx.edges(data=True))).encode())
    h.update(repr(sorted(graph.outputs.items())).encode())
    h.update(repr(sorted((name, _weight_key(w)) for name, w in graph.params.items())).encode())
    h.update(repr(vars(graph.meta)).encode())
    return h.hexdigest()


# -- numerics: does a "layout only" pass keep the logits? ------------------------------------------
NUMERICS_TOLERANCE = 1e-4


def numerics_difference(a: Graph, b: Graph, prefill: int = 6, decode: int = 6) -> float:
    """Max |logit difference| of two graphs on the same seeded tokens: a cached prefill, then decode steps.

    Decoding through each graph's own cache exercises what layout passes change (cache layout and
    storage), not only the full-sequence forward.
    """
    ids = torch.randint(0, a.meta.vocab_size, (1, prefill + decode), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    executors = [ReferenceExecutor(g) for g in (a, b)]
    caches = [ex.new_cache() for ex in executors]
    for step in [ids[:, :prefill], *ids[:, prefill:].split(1, dim=1)]:
        la, lb = (ex.forward(step, cache) for ex, cache in zip(executors, caches, strict=True))
        worst = max(worst, float((la - lb).abs().max()))
    return worst


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
    tables: dict[str, list[dict]] = field(default_factory=dict)  # the pass's PassResult.tables


def _who(p: Pass) -> str:
    return f"pass {p.spec()!r}" + (f" (plugin {p.plugin!r})" if p.plugin != "tokopt" else " (built into tokopt)")


def _contract_error(p: Pass, problem: str) -> PassContractError:
    err = PassContractError(f"{_who(p)} broke its contract: {problem}")
    err.plugin = p.plugin  # type: ignore[attr-defined]
    return err


def run_pass(p: Pass, graph: Graph, ctx: PassContext, index: int) -> StageResult:
    """requires → run → verify → ensures for one pass; the graph it returns is checked, never trusted."""
    spec = p.spec()
    _check_requires(p, conditions_of(graph, ctx), "its input graph")
    before = fingerprint(graph)
    t0 = time.perf_counter()
    result = guard_pass(p.plugin, spec, "running", lambda: p.run(graph, ctx))
    if not isinstance(result, PassResult) or not isinstance(getattr(result, "graph", None), Graph):
        raise _contract_error(p, f"run() returned {type(result).__name__}, not a PassResult with a Graph")
    new = result.graph
    if fingerprint(graph) != before:
        raise _contract_error(p, "it modified its input graph in place; copy it (graph.copy()) and change the copy")
    stage = f"pass {spec!r}" + (f" (plugin {p.plugin!r})" if p.plugin != "tokopt" else "")
    verify(new, stage=stage)
    facts = conditions_of(new, ctx)
    for cond in sorted(p.ensures):
        name, want = parse_condition(cond, spec)
        if facts[name] != want:
            raise _contract_error(p, f"it declares that its output has {describe_condition(name, want)}, "
                                     "but the graph it returned does not")
    changed = fingerprint(new) != before
    if changed and not p.changes_numerics:
        diff = numerics_difference(graph, new)
        if diff > NUMERICS_TOLERANCE:
            raise _contract_error(p, f"it declares changes_numerics=False, but its logits moved by up to {diff:.3g} "
                                     f"on a cached prefill + decode (tolerance {NUMERICS_TOLERANCE:g})")
    notes = list(result.notes)
    if bool(result.modified) != changed:
        if not result.modified:
            raise _contract_error(p, "it reported modified=False but the graph it returned differs from its input")
        log.warning("%s reported modified=True but returned an identical graph", _who(p))
    if not changed:
        notes.append("no change")
    if new is graph:  # the history line below must not touch the caller's graph
        new = graph.copy()
    if not new.history or new.history[-1] != spec:
        new.history.append(spec)
    return StageResult(index, spec, new, p, changed, notes, time.perf_counter() - t0,
                       tables=dict(getattr(result, "tables", {}) or {}))


class StageObserver(Protocol):
    """Who hears of each stage: the jobs layer forwards these to plugin observers."""

    def stage_start(self, stage: str, index: int, graph: Graph) -> None: ...

    def stage_end(self, stage: str, index: int, graph: Graph, metrics: dict[str, Any], notes: list[str]) -> None: ...


def run_pipeline(passes: list[Pass], graph: Graph, ctx: PassContext,
                 on_stage: Callable[[StageResult, StageResult | None], None] | None = None,
                 observer: StageObserver | None = None) -> list[StageResult]:
    """Run ``passes`` in order; ``on_stage(stage, previous)`` measures each stage (baseline first)."""
    stages = [StageResult(0, "baseline", graph)]
    if observer:
        observer.stage_start("baseline", 0, graph)
    if on_stage:
        on_stage(stages[0], None)
    if observer:
        observer.stage_end("baseline", 0, graph, stages[0].metrics, [])
    for i, p in enumerate(passes, start=1):
        current = stages[-1].graph
        if observer:
            observer.stage_start(p.spec(), i, current)
        log.info("stage %d: %s", i, p.spec())
        stage = run_pass(p, current, ctx, i)
        stages.append(stage)
        if on_stage:
            on_stage(stage, stages[-2])
        if observer:
            observer.stage_end(stage.name, i, stage.graph, stage.metrics, stage.notes)
    return stages


__all__ = ["check_pipeline", "conditions_of", "fingerprint", "run_pass", "run_pipeline", "StageResult",
           "StageObserver"]
