"""The job behind ``tokopt optimize``.

``optimize`` resolves and checks the whole pipeline first (cheap), then loads the
evaluation text, measures the baseline, runs each pass (verify + measure after each),
lowers the final graph to the backend, checks its parity with the reference executor,
evaluates the gates, and writes OUT atomically: artifact, ``report.json``/``.md``/``.html``
and the resolved ``recipe.yaml`` appear together or not at all.

Per stage, quality is measured on the reference executor (the oracle; attention and norms
through torch's fused float32 kernels, ~1e-6 from its float64 definition) on the same eval batches;
speed on the backend's real artifact, lowered for that stage and loaded in a fresh process
(so its peak memory is its own), or — with no backend — on the reference executor in this
process.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tokopt.backends.artifact import atomic_directory, check_output, weight_file_bytes
from tokopt.backends.base import Backend
from tokopt.backends.registry import backends_that_honour
from tokopt.errors import (
    BackendRefusalError,
    BackendUnavailableError,
    GateError,
    PassContractError,
    PassOptionError,
    PreconditionError,
    UsageError,
)
from tokopt.jobs.common import config_of, load_model, make_progress
from tokopt.measure.agreement import disagreements
from tokopt.measure.gates import GateResult, Gates, check_gates
from tokopt.measure.machine import bandwidth_override
from tokopt.measure.quality import EvalConfig, QualityEvaluator, build_calibration, build_eval_data
from tokopt.measure.speed import (
    ArtifactTimer,
    SpeedConfig,
    informative_kv_context,
    measure_speed,
    peak_rss_bytes,
    reset_peak_rss,
)
from tokopt.optimizer.corpus import resolve_texts, tokenizer_for
from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import dense_nbytes, memory_budget, streams
from tokopt.optimizer.manager import StageResult, check_pipeline, run_pipeline
from tokopt.optimizer.pass_api import Pass, PassContext
from tokopt.optimizer.recipe import load_recipe, resolved_recipe
from tokopt.passes.pipeline import parse_passes, recipe_passes, resolve
from tokopt.report.document import LONG_METRIC_KEYS, STAGE_METRIC_KEYS, new_report, stage_metrics, write_reports

log = logging.getLogger(__name__)

SPEED_MODES = ("auto", "artifact", "reference", "off")
SLOWER_WARNING = 0.95  # warn when a pass leaves decode below 95 % of the stage before


@dataclass
class SharedBaseline:
    """A baseline measured once — stage 0's metrics and details, and the eval text's log-probabilities
    (what KL is measured against) — that other ``optimize`` runs of the same model with the same eval,
    speed and backend settings reuse instead of measuring it again (``tokopt sweep`` hands it to every
    trial).  ``fingerprint`` says what it was measured on; a run with other settings refuses it."""

    fingerprint: str
    metrics: dict[str, Any]
    extra: dict[str, Any]
    log_probs: list[Any]  # torch tensors, one per eval batch
    ppl: float
    long_ppl: float | None = None


@dataclass
class OptimizeResult:
    """What ``optimize`` did.  ``passed`` is False when a gate failed (then nothing was written)."""

    report: dict[str, Any] | None
    out: Path | None
    gates: list[GateResult] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # the checked pipeline (always; the only output of a dry run)
    baseline: SharedBaseline | None = None  # with keep_baseline=True: the baseline, for other runs to share

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def gate_error(self) -> GateError | None:
        failed = [g for g in self.gates if not g.passed]
        if not failed:
            return None
        return GateError("gate failed: " + "; ".join(f"{g.gate} {g.limit:g}: {g.message}" for g in failed)
                         + ". Nothing was written")


def _model_section(graph: Graph) -> dict[str, Any]:
    from tokopt.optimizer.ir.summary import describe

    info = describe(graph)
    keys = ("source", "architecture", "model_type", "layers", "hidden_size", "vocab_size", "num_heads",
            "num_kv_heads", "head_dim", "window", "sinks", "kv_cache_dtype", "history")
    return {k: info.get(k) for k in keys}


@contextlib.contextmanager
def _naming_recipe(recipe: str | Path | None) -> Iterator[None]:
    """Errors in what a recipe file said name the file (the option alone does not say where it was written)."""
    try:
        yield
    except (PassOptionError, UsageError) as exc:
        if recipe is None or str(recipe) in str(exc):
            raise
        raise type(exc)(f"recipe {recipe}: {exc}") from None


def optimize(model: str | Path | Graph, passes: str | None = None, *, recipe: str | Path | None = None,
             backend: str | None = None, out: str | Path | None = None, eval_text: str | Path | None = None,
             calib_text: str | Path | None = None, dry_run: bool = False, force: bool = False,
             gates: Gates | None = None, eval_options: dict[str, Any] | None = None,
             speed_options: dict[str, Any] | None = None, speed: str = "auto", seed: int = 0,
             progress: bool | None = None, baseline: SharedBaseline | None = None,
             keep_baseline: bool = False, measure_long: bool = False) -> OptimizeResult:
    """Run a pipeline on ``model`` and write OUT; see the module docstring for the order of work.

    ``passes`` uses the ``--passes`` syntax (``None`` = take them from ``recipe``; ``""`` =
    none).  ``backend`` ``None`` takes the recipe's (default ``"torch"``); ``"none"`` lowers
    nothing.  ``speed``: ``auto`` (the artifact when there is a backend, else the reference
    executor), ``artifact``, ``reference`` or ``off``.  Gate failures do not raise: check
    :attr:`OptimizeResult.passed` (the CLI exits 1).  ``baseline``: a :class:`SharedBaseline` measured by
    an earlier run with the same settings (``keep_baseline=True`` returns this run's) — stage 0 is then
    taken from it, not measured again.  ``measure_long`` measures long-context perplexity even when no pass
    moves it (a shared baseline for pipelines that do).
    """
    from tokopt.optimizer.interpret import ReferenceExecutor

    t_start = time.perf_counter()
    rec = load_recipe(recipe) if recipe else {}
    if passes is not None and rec.get("passes"):
        raise UsageError("the pipeline is given twice (--passes and the recipe's 'passes'); use one of them")
    with _naming_recipe(recipe):
        specs = parse_passes(passes) if passes is not None else recipe_passes(rec.get("passes"), f"recipe {recipe}")
        gates = (gates or Gates()).merged(rec.get("gates"))
        eval_config: EvalConfig = config_of(EvalConfig, rec.get("eval"), eval_options, "eval options")
        speed_config: SpeedConfig = config_of(SpeedConfig, rec.get("speed"), speed_options, "speed options")
        speed_asked = bool(rec.get("speed")) or any(v is not None for v in (speed_options or {}).values())
    if speed not in SPEED_MODES:
        raise UsageError(f"speed={speed!r}; choose one of {', '.join(SPEED_MODES)}")
    backend_name = backend if backend is not None else rec.get("backend", "torch")
    if backend_name in (None, "", "none"):
        backend_name = None
    if out is None and not dry_run:
        raise UsageError("an output directory is required (-o/--out OUT); or use --dry-run")
    out_path = Path(out).expanduser().resolve() if out is not None else None
    if out_path is not None and not dry_run:
        check_output(out_path, force)
    bandwidth_override()  # a bad $TOKOPT_MEMORY_BANDWIDTH fails now, not after the measurements

    with _naming_recipe(recipe if passes is None else None):
        pass_objs = resolve(specs)  # unknown passes/options fail here, before anything is loaded
    check_moves(pass_objs)
    backend_obj = None
    if backend_name:
        from tokopt.backends.registry import get_backend

        backend_obj = get_backend(backend_name)
        ok, why = backend_obj.availability()
        if not ok:
            raise BackendUnavailableError(f"backend {backend_name!r} cannot run here: {why}")
    mode = ("artifact" if backend_obj else "reference") if speed == "auto" else speed
    if mode == "artifact" and backend_obj is None:
        raise UsageError("speed measured on the artifact needs a backend (--backend NAME)")
    if gates.min_decode_speedup is not None and mode == "off":
        raise UsageError("--min-decode-speedup needs speed measurement; do not turn it off")

    reset_peak_rss()  # stage 0's peak memory counts from here: the model's loading is part of it
    graph = model if isinstance(model, Graph) else load_model(model)
    source = str(model) if not isinstance(model, Graph) else (graph.meta.source or "graph")
    tokenizer = tokenizer_for(graph)
    eval_src, calib_src = resolve_texts(eval_text, calib_text)
    calibration, calib_info = build_calibration(calib_src, eval_config, tokenizer, graph.meta.vocab_size)
    show = make_progress(progress)
    ctx = PassContext(calibration, seed=seed, backend=backend_name, progress=show, reference_graph=graph)
    check_pipeline(pass_objs, graph, ctx)
    _check_streaming(pass_objs, graph)
    lean = streams(graph.params) and not speed_asked
    if lean:
        speed_config = speed_config.lean()
        log.info("the model is past the weight memory budget: its artifact's speed is measured at batch 1 and its "
                 "KV memory is not measured (a recipe's speed section measures more)")
    if backend_obj is not None:
        check_stages(backend_obj, pass_objs, graph, ctx)
    with_long = measure_long or any("long_ppl" in p.moves for p in pass_objs)
    data = build_eval_data(eval_src, eval_config, tokenizer, graph.meta.vocab_size, with_long=with_long)
    recipe_out = resolved_recipe(pass_objs, model=source, backend=backend_name or "none",
                                 eval=eval_config.as_dict(), speed=speed_config.as_dict(),
                                 gates={k: v for k, v in gates.as_dict().items() if v is not None} or None)
    plan = {"model": _model_section(graph), "backend": backend_name, "speed": mode, "recipe": recipe_out,
            "eval": data.source, "calibration": calib_info, "long_context": with_long, "checks": "passed"}
    measured_on = baseline_fingerprint(source, backend_name, data.source, eval_config, seed)
    if baseline is not None and baseline.fingerprint != measured_on:
        raise UsageError("the shared baseline was measured with another model, backend, eval text or settings; "
                         "measure it again with these")
    if baseline is not None and with_long and baseline.long_ppl is None:
        raise UsageError("this pipeline moves long-context perplexity but the shared baseline did not measure it; "
                         "measure the baseline with measure_long=True")
    if dry_run:
        log.info("dry run: the pipeline of %d pass(es) checks out", len(pass_objs))
        return OptimizeResult(None, None, [], plan)

    from tokopt import plugins
    from tokopt.measure.machine import describe_machine

    assert out_path is not None
    plugins.notify_pipeline_start(source, [p.spec() for p in pass_objs], backend_name, graph)
    report: dict[str, Any] | None = None
    try:
        machine = describe_machine()
        bandwidth = machine["memory_bandwidth_bytes_per_s"]
        evaluator = QualityEvaluator(data, show)
        if baseline is not None:
            evaluator.prime(baseline.log_probs, baseline.ppl, baseline.long_ppl)
        shared = None if baseline is None else StageResult(0, "baseline", graph, metrics=baseline.metrics,
                                                           extra=baseline.extra)
        warnings: list[str] = []
        artifact_info: dict[str, Any] | None = None
        last = len(pass_objs)
        # past the memory budget only the final artifact is written and measured: an earlier stage's
        # (the float32 baseline's above all) would not fit where the model itself does not
        streamed = streams(graph.params)
        with atomic_directory(out_path, force) as tmp, tempfile.TemporaryDirectory(prefix="tokopt-stage-") as scratch:

            def on_stage(stage: StageResult, prev: StageResult | None) -> None:
                nonlocal artifact_info
                if stage.index == 0 and shared is not None:  # measured once, by another run: reused whole
                    prev = shared
                seconds: dict[str, float] = {"pass": round(stage.seconds, 3)}
                values: dict[str, Any] = static_metrics(stage.graph).as_dict()
                values["decode_tok_s_bound"] = bandwidth / values["bytes_per_token"]
                if backend_obj is not None and stage.index:  # checked before it is measured
                    check_stage(backend_obj, stage.graph, f"the graph after {stage.name!r}")
                reuse = prev is not None and (stage.changed is False or prev is shared)
                weights = None  # the stage's dequantized weights, once: its parity check reads them too
                evaluated = None  # the final artifact's session, when its quality was measured on it
                if reuse:
                    quality = {k: prev.metrics.get(k) for k in ("ppl", "kl", "top1_agreement", "long_ppl")}
                    quality.update(ppl_delta_pct=prev.metrics["ppl_delta_pct"],
                                   long_ppl_delta_pct=prev.metrics.get("long_ppl_delta_pct"))
                    quality_on = prev.extra.get("quality_measured_on")
                    seconds["eval"] = 0.0
                artifact_dir = None
                measured_here = mode == "artifact" and not reuse and (stage.index == last or not streamed)
                # the measuring process starts now: its imports overlap the lowering below
                with ArtifactTimer() if measured_here else contextlib.nullcontext() as timer:
                    if backend_obj is not None and (stage.index == last or measured_here):
                        t0 = time.perf_counter()
                        artifact_dir = tmp if stage.index == last else Path(scratch) / f"stage{stage.index}"
                        # the final artifact's parity is checked below (_parity), on the same files: not twice; an
                        # earlier stage's scratch artifact only gives that stage's speed and never ships: not checked
                        # (~4 s a stage); the report's parity is the shipped artifact's
                        no_check = {"parity": False} if _takes(backend_obj.lower, "parity") else {}
                        lowered = backend_obj.lower(stage.graph, artifact_dir, **no_check)
                        seconds["lower"] = round(time.perf_counter() - t0, 3)
                        values["artifact_bytes"] = weight_file_bytes(artifact_dir)
                    if not reuse:
                        t0 = time.perf_counter()
                        on_artifact = artifact_dir is not None and backend_obj.quality_on_artifact and not streamed
                        if on_artifact:
                            session = backend_obj.load(artifact_dir)
                            quality = evaluator.measure(session.forward, long=with_long, desc=stage.name)
                            quality_on = f"{backend_name} artifact, in process"
                            if stage.index == last:  # the shipped artifact's parity check reads the same session
                                evaluated = session
                            del session
                        else:
                            executor = ReferenceExecutor(stage.graph, exact=False)
                            weights = executor.weight
                            quality = evaluator.measure(executor.forward, long=with_long, desc=stage.name)
                            quality_on = "reference executor (the IR)"
                        seconds["eval"] = round(time.perf_counter() - t0, 3)
                    values.update(quality)
                    if artifact_dir is not None and stage.index == last:
                        artifact_info = _parity(backend_obj, stage.graph, tmp, lowered, weights, evaluated)
                    speed_detail: dict[str, Any] = {}
                    stage_speed = replace(speed_config, kv_context=informative_kv_context(stage.graph,
                                                                                          speed_config.kv_context))
                    t0 = time.perf_counter()
                    if reuse:
                        speed_detail = dict(prev.extra.get("speed", {}))
                        values["artifact_bytes"] = prev.metrics.get("artifact_bytes")
                    elif measured_here:
                        speed_detail = timer.measure(artifact_dir, stage_speed)
                        speed_detail["measured_on"] = f"{backend_name} artifact, fresh process" + (
                            " (batch 1, KV memory not measured: the model is past the weight memory budget; a "
                            "recipe's speed section measures more)" if lean else "")
                    elif mode == "artifact":
                        speed_detail = {"measured_on": "not measured: the model is past the weight memory budget "
                                                       "(TOKOPT_WEIGHT_MEMORY), so only the final artifact is lowered"}
                    elif mode == "reference":
                        speed_detail = measure_speed(ReferenceExecutor(stage.graph), stage.graph.meta.vocab_size,
                                                     stage_speed)
                        speed_detail["measured_on"] = "reference executor, in process"
                    if artifact_dir is not None and stage.index != last:
                        shutil.rmtree(artifact_dir, ignore_errors=True)
                seconds["speed"] = round(time.perf_counter() - t0, 3)
                for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "kv_bytes_measured"):
                    values[key] = speed_detail.get(key)
                stage.metrics = stage_metrics(values, with_long)
                mismatches = disagreements(stage.metrics)
                stage.extra = {"speed": speed_detail, "seconds": seconds, "quality_measured_on": quality_on,
                               "bytes_per_token": values["bytes_per_token"], "mismatches": mismatches}
                warnings.extend(f"{stage.name}: measured and analytic disagree — {m['message']}" for m in mismatches)
                if prev is not None and values.get("decode_tok_s") and prev.metrics.get("decode_tok_s") and \
                        values["decode_tok_s"] < SLOWER_WARNING * prev.metrics["decode_tok_s"]:
                    warnings.append(f"{stage.name} decodes slower than the stage before it: "
                                    f"{prev.metrics['decode_tok_s']:.1f} -> {values['decode_tok_s']:.1f} tok/s")
                if stage.changed is False:
                    warnings.append(f"{stage.name} changed nothing")
                if prev is shared:
                    stage.extra["shared_baseline"] = True
                # this process's own high-water mark over the pass, its evaluation, lowering and parity
                stage.extra["tokopt_peak_rss_bytes"] = peak_rss_bytes()
                reset_peak_rss()
                log.info("stage %d %s: ppl %.3f", stage.index, stage.name, values["ppl"])

            stages = run_pipeline(pass_objs, graph, ctx, on_stage, plugins.StageNotifier())
            eval_info = dict(data.source)
            report = new_report(
                machine=machine, model=_model_section(graph), backend=backend_name,
                speed_measured_on=stages[0].extra["speed"].get("measured_on", "not measured"),
                quality_measured_on=stages[-1].extra.get("quality_measured_on"),
                recipe=recipe_out, eval=eval_info, calibration=calib_info, eval_config=eval_config.as_dict(),
                speed_config=speed_config.as_dict(), stages=[_stage_record(s) for s in stages],
                warnings=warnings, artifact=artifact_info,
            )
            mismatches = [{**m, "message": f"{s.name}: {m['message']}"} for s in stages for m in s.extra["mismatches"]]
            gate_results = check_gates(gates, stages[0].metrics, stages[-1].metrics, mismatches)
            report["gates"] = [g.as_dict() for g in gate_results]
            report["passed"] = all(g.passed for g in gate_results)
            report["seconds"] = round(time.perf_counter() - t_start, 3)
            report["tokopt_peak_rss_bytes"] = max(s.extra["tokopt_peak_rss_bytes"] for s in stages)
            report["weights_streamed"] = streamed
            if not report["passed"]:
                raise _GatesFailed()
            write_reports(report, tmp)
    except _GatesFailed:
        plugins.notify_pipeline_end(report, None, None)
        return OptimizeResult(report, None, gate_results, plan)
    except BaseException as exc:
        plugins.notify_pipeline_end(report, None, exc)
        raise
    plugins.notify_pipeline_end(report, out_path, None)
    kept = None
    if keep_baseline:
        base_lp, base_ppl, base_long = evaluator.baseline_state()
        kept = SharedBaseline(measured_on, stages[0].metrics, stages[0].extra, base_lp, base_ppl, base_long)
    return OptimizeResult(report, out_path, gate_results, plan, kept)


def baseline_fingerprint(*settings: Any) -> str:
    """What a baseline's quality and artifact depend on, as one digest (model, backend, eval text and config,
    seed) — not how speed is measured, which a sharing run takes as it was."""
    import hashlib
    import json

    def plain(v: Any) -> Any:
        return v.as_dict() if hasattr(v, "as_dict") else v

    text = json.dumps([plain(v) for v in settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_stages(backend: Backend, passes: list[Pass], graph: Graph, ctx: PassContext) -> None:
    """The backend's capabilities against every stage it can foresee: the model, then each pass's preview.

    A pass that cannot preview ends the foresight; its stage and the ones after it are checked as
    soon as they exist, before they are measured (:func:`check_stage`).
    """
    check_stage(backend, graph, "the model")
    for p in passes:
        previewed = p.preview(graph, ctx)
        if previewed is None:
            log.info("%s cannot be previewed: its stage is checked against %s once it exists", p.spec(), backend.name)
            return
        check_stage(backend, previewed, f"the graph after {p.spec()!r}")
        graph = previewed


def check_stage(backend: Backend, graph: Graph, what: str) -> None:
    """``backend.check(graph)``; a refusal also says which backends could honour the graph."""
    try:
        backend.check(graph)
    except BackendRefusalError as exc:
        able = [b for b in backends_that_honour(graph) if b != backend.name]
        raise BackendRefusalError(f"{what}: {exc}; backends that can: {', '.join(able) or 'none installed'}") from None


def check_moves(passes: list[Pass]) -> None:
    """Every metric a pass promises to move must be one the report measures (names the pass and plugin)."""
    known = set(STAGE_METRIC_KEYS) | set(LONG_METRIC_KEYS)
    for p in passes:
        unknown = sorted(set(p.moves) - known)
        if unknown:
            who = f"plugin {p.plugin!r}" if p.plugin != "tokopt" else "built into tokopt"
            err = PassContractError(f"pass {p.spec()!r} ({who}) declares moves={list(p.moves)}, but the report has no "
                                    f"metric {', '.join(unknown)}; report metrics: {', '.join(sorted(known))}")
            err.plugin = p.plugin  # type: ignore[attr-defined]
            raise err


class _GatesFailed(Exception):
    """Internal: unwinds the atomic output directory (nothing is written when a gate fails)."""


def _takes(fn: Any, name: str) -> bool:
    """Whether ``fn`` accepts keyword ``name`` (a plugin backend's ``lower`` may take only the graph and OUT)."""
    import inspect

    return name in inspect.signature(fn).parameters


def _check_streaming(pass_objs: list[Pass], graph: Graph) -> None:
    """A model past the weight memory budget runs only passes that stream; the others are refused now."""
    if not streams(graph.params):
        return
    for p in pass_objs:
        why = p.whole_model()
        if why:
            raise PreconditionError(
                f"{p.spec()} cannot run on this model: {why}, and its float32 weights "
                f"({dense_nbytes(graph.params) / 2**30:.1f} GiB) are past the weight memory budget "
                f"({memory_budget() / 2**30:.1f} GiB); raise TOKOPT_WEIGHT_MEMORY if the machine has the "
                "memory, or leave that option out")


def _parity(backend_obj: Any, graph: Graph, path: Path, lowered: Any, weights: Any = None,
            session: Any = None) -> dict[str, Any]:
    """Load the final artifact and compare its logits with the reference executor (ParityError: exit 4).

    ``weights``: the graph's dequantized weights if the evaluation made them; ``session``: the artifact's
    session if the evaluation opened it (opening it again costs ~0.5 s for SmolLM2).  A graph past the memory
    budget is compared with its artifact loaded in a child process.
    """
    from tokopt.backends.parity import check_parity
    from tokopt.backends.process_session import ProcessSession
    from tokopt.optimizer.interpret import ReferenceExecutor

    label = f"the {backend_obj.name} artifact"
    child: dict[str, Any] = {}
    reference = ReferenceExecutor(graph, weights=weights)
    if streams(graph.params):  # past the memory budget: the artifact's session must not share this process
        with ProcessSession(backend_obj.name, path) as session:
            report = check_parity(graph, session, label=label, reference=reference)
            child["session_peak_rss_bytes"] = session.peak_rss_bytes()
    else:
        session = session or backend_obj.load(path)
        report = check_parity(graph, session, label=label, reference=reference)
    files = list(getattr(lowered, "files", []) or [])
    # a session that chooses kernels per weight format says which ran: a weight held in float32 since load
    # ("dequantized") must not hide behind the graph's int4 bits_per_param
    kernels = getattr(session, "linear_kernels", None)
    return {"backend": backend_obj.name, "plugin": getattr(backend_obj, "plugin", "tokopt"), "files": files,
            "parity": {**report.to_dict(), **child}, **({"linear_kernels": kernels} if kernels else {})}


def _stage_record(stage: StageResult) -> dict[str, Any]:
    p = stage.pass_
    return {
        "index": stage.index, "name": stage.name, "pass": p.name if p else None,
        "plugin": p.plugin if p else None, "options": dict(p.opts) if p else None,
        "changed": stage.changed, "notes": list(stage.notes), "seconds": stage.extra.get("seconds", {}),
        "metrics": dict(stage.metrics), "quality_measured_on": stage.extra.get("quality_measured_on"),
        "speed": {k: v for k, v in stage.extra.get("speed", {}).items()
                    if k not in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "kv_bytes_measured")},
        "bytes_per_token": stage.extra.get("bytes_per_token"),
        "mismatches": stage.extra.get("mismatches", []),
        "tokopt_peak_rss_bytes": stage.extra.get("tokopt_peak_rss_bytes"),
        **({"tables": stage.tables} if stage.tables else {}),
    }



__all__ = ["optimize", "OptimizeResult", "SPEED_MODES", "check_moves"]
