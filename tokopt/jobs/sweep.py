"""The job behind ``tokopt sweep``: every pipeline of a grid, as trials, and the cheapest one within a bar.

A grid is the ``--passes`` syntax with alternatives: ``|`` between values of an option, ``?`` after a
pass name for "with and without it"::

    quantize:bits=4|8,group_size=32|64,sparse-attention?:window=128|256   # 2 x 2 x 3 = 12 pipelines

The baseline is measured once (:class:`~tokopt.jobs.optimize.SharedBaseline`: its metrics and the eval
text's log-probabilities) and handed to every trial, which runs the pipeline with ``optimize`` into its
own directory.  Trials run on Ray (``tokopt[distributed]``: a local cluster of ``workers`` processes, or
the cluster at ``address``) or, with one worker, in this process.  A trial that fails is recorded with its
error and the others go on.  Finished trials are kept under ``OUT/trials/<key>/`` (the key digests the
model, settings and pipeline), so a re-run resumes; failed ones are tried again.

Speed is measured afterwards, one artifact at a time on this machine (trials measured while others run
would measure each other), unless ``speed="off"``.  ``sweep.json``, ``sweep.html`` (the Pareto fronts of
quality against weight bytes, KV bytes per token and decode tok/s) and the ``recipe.yaml`` of the cheapest
trial within ``max_ppl_increase`` (fewest weight bytes) are written to OUT.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokopt.errors import RecipeError, UsageError
from tokopt.jobs.common import make_progress
from tokopt.jobs.optimize import SharedBaseline, optimize
from tokopt.optimizer.recipe import PassSpec, parse_passes
from tokopt.report.sweep_page import FRONTS, render_sweep_html
from tokopt.version import __version__

log = logging.getLogger(__name__)

TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
BASELINE_FILE = "baseline.pt"
#: Figures a trial records from its report's last stage (and the baseline's).
TRIAL_METRICS = ("ppl", "ppl_delta_pct", "kl", "top1_agreement", "long_ppl_delta_pct", "weight_bytes",
                 "artifact_bytes", "bits_per_param", "kv_bytes_per_token", "kv_bytes_at_2048", "decode_tok_s_bound")


def trial_metrics(stage_metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures a sweep compares, from one stage's metrics (KV bytes at 2,048 tokens: what a window buys)."""
    flat = {**stage_metrics, "kv_bytes_at_2048": (stage_metrics.get("kv_bytes_at") or {}).get("2048")}
    return {k: flat.get(k) for k in TRIAL_METRICS}


@dataclass
class Trial:
    """One pipeline of the grid and what became of it."""

    passes: str
    key: str
    status: str = "pending"  # ok, failed, cached
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float | None = None
    speed: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "key": self.key, "status": self.status, "metrics": self.metrics,
                "error": self.error, "seconds": self.seconds, "speed": self.speed}


# -- the grid ----------------------------------------------------------------------------------------------
def expand_grid(grid: str, known: Iterable[str]) -> list[str]:
    """Every pipeline of ``grid``, in ``--passes`` syntax (see the module docstring); the empty pipeline
    (every optional pass left out) is not a trial — it is the baseline."""
    known = set(known)
    specs = parse_passes(grid, known | {f"{k}?" for k in known}, where="--grid")
    if not specs:
        raise RecipeError("--grid: no pass given; e.g. --grid 'quantize:bits=4|8,group_size=32|64'")
    choices: list[list[PassSpec | None]] = []
    for spec in specs:
        optional = spec.name.endswith("?")
        name = spec.name.removesuffix("?")
        keys = list(spec.options)
        values = [[v.strip() for v in str(spec.options[k]).split("|")] for k in keys]
        if any("" in vs for vs in values):
            raise RecipeError(f"--grid: {spec.name}: an empty alternative in {spec.options}")
        alternatives: list[PassSpec | None] = [PassSpec(name, dict(zip(keys, combo, strict=True)))
                                               for combo in itertools.product(*values)]
        choices.append([None, *alternatives] if optional else alternatives)
    pipelines = []
    for combo in itertools.product(*choices):
        text = ",".join(_render(s) for s in combo if s is not None)
        if text and text not in pipelines:
            pipelines.append(text)
    return pipelines


def _render(spec: PassSpec) -> str:
    return spec.name + (":" + ",".join(f"{k}={v}" for k, v in spec.options.items()) if spec.options else "")


def _expected_cost(trial: Trial) -> tuple[int, int]:
    """A rough order of trial durations: passes in the pipeline, then calibrated (4-bit) quantization."""
    return trial.passes.count(":"), int("bits=4" in trial.passes)


def trial_key(settings: str, passes: str) -> str:
    return hashlib.sha256(f"{__version__}\n{settings}\n{passes}".encode()).hexdigest()[:12]


# -- one trial (runs in a Ray worker or in this process) -------------------------------------------------
def run_trial(model: str, passes: str, out: str, baseline: SharedBaseline, options: dict[str, Any],
              threads: int | None = None) -> dict[str, Any]:
    """``optimize`` one pipeline into ``out`` with the shared baseline; the trial record, never an exception
    (a failing trial is data: the sweep goes on)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    record: dict[str, Any] = {"status": "failed", "metrics": {}, "error": None}
    try:
        result = optimize(model, passes, out=out, force=True, baseline=baseline, speed="off", progress=False,
                          measure_long=baseline.long_ppl is not None, **options)
        if result.report is None or not result.passed:
            record["error"] = str(result.gate_error() or "no report")
        else:
            record.update(status="ok", metrics=trial_metrics(result.report["stages"][-1]["metrics"]))
    except Exception as exc:  # noqa: BLE001 - any failure of one trial is recorded, not raised
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


# -- the sweep ------------------------------------------------------------------------------------------
def sweep(model: str | Path, grid: str, out: str | Path, *, backend: str = "onnxruntime", workers: int = 1,
          address: str | None = None, max_ppl_increase: float | None = None, speed: str = "artifact",
          eval_text: str | Path | None = None, calib_text: str | Path | None = None,
          eval_options: dict[str, Any] | None = None, speed_options: dict[str, Any] | None = None,
          keep_artifacts: bool = False, seed: int = 0, progress: bool | None = None) -> dict[str, Any]:
    """Run every pipeline of ``grid`` on ``model``; write OUT (see the module docstring); return sweep.json."""
    from tokopt.passes.pipeline import parse_passes as parse_known
    from tokopt.passes.pipeline import resolve
    from tokopt.passes.registry import known_pass_names

    if workers < 1:
        raise UsageError(f"--workers {workers}: need at least 1")
    if speed not in ("artifact", "off"):
        raise UsageError(f"speed={speed!r}: a sweep measures the artifacts (artifact) or nothing (off)")
    pipelines = expand_grid(grid, known_pass_names())
    for p in pipelines:  # unknown options and bad values fail now, not in every trial
        resolve(parse_known(p))
    use_ray = workers > 1 or address is not None
    ray = _import_ray() if use_ray else None
    out_dir = Path(out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    options = {"backend": backend, "eval_text": str(eval_text) if eval_text else None,
               "calib_text": str(calib_text) if calib_text else None, "eval_options": eval_options,
               "seed": seed}
    model = str(model)
    settings = json.dumps({"model": model, **options, "speed_options": speed_options}, sort_keys=True)
    show = make_progress(progress)
    started = time.perf_counter()

    long = any("long_ppl" in q.moves for p in pipelines for q in resolve(parse_known(p)))
    baseline, base_metrics = _baseline(model, out_dir, settings, options, speed_options, long)
    trials = [Trial(p, trial_key(settings, p)) for p in pipelines]
    # longest first (more passes, then 4-bit's calibration): two workers do not end on one long trial alone
    todo = sorted((t for t in trials if _read_cached(out_dir, t) is None), key=_expected_cost, reverse=True)
    log.info("sweep: %d pipelines, %d cached, %d to run on %s", len(trials), len(trials) - len(todo), len(todo),
             f"Ray ({address or f'local, {workers} workers'})" if use_ray else "this process")
    threads = max(1, (os.cpu_count() or 1) // workers) if address is None else None
    run = _run_on_ray(ray, address, workers) if use_ray else _run_here
    for trial, record in show(run(model, todo, out_dir, baseline, options, threads), total=len(todo),
                              desc="sweep", unit="trial"):
        trial.status, trial.metrics = record["status"], record["metrics"]
        trial.error, trial.seconds = record["error"], record["seconds"]
        _write_trial(out_dir, trial)
    trials_seconds = time.perf_counter() - started
    if speed == "artifact":
        _measure_speeds(out_dir, trials, speed_options, show)
    if not keep_artifacts:
        for t in trials:
            _drop_artifact(out_dir / TRIALS_DIR / t.key)
    result = _summarise(model, grid, out_dir, trials, base_metrics, max_ppl_increase, workers, address,
                        trials_seconds, time.perf_counter() - started, speed)
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out_dir / "sweep.html").write_text(render_sweep_html(result))
    best = result["best"]
    recipe = out_dir / "recipe.yaml"
    if best is not None:
        shutil.copyfile(out_dir / TRIALS_DIR / best["key"] / "recipe.yaml", recipe)
    elif recipe.exists():
        recipe.unlink()
    return result


def _baseline(model: str, out_dir: Path, settings: str, options: dict[str, Any],
              speed_options: dict[str, Any] | None, long: bool) -> tuple[SharedBaseline, dict[str, Any]]:
    """The baseline, measured once per settings (cached in OUT) with its speed on the artifact, and its
    long-context perplexity when a pipeline moves it."""
    import torch

    key = trial_key(settings, f"baseline long={long}")
    path = out_dir / TRIALS_DIR / f"baseline-{key}" / BASELINE_FILE
    if path.is_file():
        payload = torch.load(path, weights_only=True)
        return SharedBaseline(**payload), {**payload["metrics"], **trial_metrics(payload["metrics"])}
    result = optimize(model, "", out=path.parent, force=True, keep_baseline=True, speed="artifact",
                      speed_options=speed_options, progress=False, measure_long=long, **options)
    assert result.baseline is not None
    b = result.baseline
    torch.save({"fingerprint": b.fingerprint, "metrics": b.metrics, "extra": b.extra, "log_probs": b.log_probs,
                "ppl": b.ppl, "long_ppl": b.long_ppl}, path)
    return b, {**b.metrics, **trial_metrics(b.metrics)}


def _read_cached(out_dir: Path, trial: Trial) -> Trial | None:
    path = out_dir / TRIALS_DIR / trial.key / TRIAL_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("status") not in ("ok", "cached") or record.get("passes") != trial.passes:
        return None  # failed before: try again
    trial.status, trial.metrics, trial.seconds = "cached", record["metrics"], record.get("seconds")
    trial.speed = record.get("speed")
    return trial


def _write_trial(out_dir: Path, trial: Trial) -> None:
    directory = out_dir / TRIALS_DIR / trial.key
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TRIAL_FILE).write_text(json.dumps(trial.as_dict(), indent=2, default=float) + "\n")


Runner = Callable[[str, list[Trial], Path, SharedBaseline, dict[str, Any], int | None],
                  Iterable[tuple[Trial, dict[str, Any]]]]


def _run_here(model: str, todo: list[Trial], out_dir: Path, baseline: SharedBaseline, options: dict[str, Any],
              threads: int | None) -> Iterable[tuple[Trial, dict[str, Any]]]:
    for t in todo:
        yield t, run_trial(model, t.passes, str(out_dir / TRIALS_DIR / t.key), baseline, options, threads)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("more than one worker (or --address) runs trials on Ray, which is not installed: "
                         "pip install 'tokopt[distributed]'; or use --workers 1 to run them here") from None
    return ray


def _run_on_ray(ray: Any, address: str | None, workers: int) -> Runner:
    def run(model: str, todo: list[Trial], out_dir: Path, baseline: SharedBaseline, options: dict[str, Any],
            threads: int | None) -> Iterable[tuple[Trial, dict[str, Any]]]:
        if not todo:
            return
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        try:
            task = ray.remote(num_cpus=1, max_retries=0)(run_trial)
            shared = ray.put(baseline)
            pending = {task.remote(model, t.passes, str(out_dir / TRIALS_DIR / t.key), shared, options, threads): t
                       for t in todo}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                trial = pending.pop(done[0])
                try:
                    record = ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - a worker that died (memory, signal) fails its trial only
                    record = {"status": "failed", "metrics": {}, "error": f"worker lost: {type(exc).__name__}: "
                                                                          f"{str(exc).splitlines()[0]}",
                              "seconds": None}
                yield trial, record
        finally:
            if started_here:
                ray.shutdown()

    return run


def _measure_speeds(out_dir: Path, trials: list[Trial], speed_options: dict[str, Any] | None, show: Any) -> None:
    """Decode/prefill speed of each finished trial's artifact, one at a time, each in a fresh process."""
    from tokopt.jobs.common import config_of
    from tokopt.measure.speed import SpeedConfig, measure_artifact_speed

    config = config_of(SpeedConfig, None, speed_options, "speed options")
    for t in show([t for t in trials if t.status in ("ok", "cached") and t.speed is None], desc="speed",
                  unit="artifact"):
        directory = out_dir / TRIALS_DIR / t.key
        try:
            detail = measure_artifact_speed(directory, config)
            t.speed = {k: detail.get(k) for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_bytes")}
        except Exception as exc:  # noqa: BLE001 - a trial whose artifact cannot be timed keeps its quality
            t.speed = {"error": f"{type(exc).__name__}: {exc}"}
        _write_trial(out_dir, t)


def _drop_artifact(directory: Path) -> None:
    """Keep a trial's records (trial.json, report.*, recipe.yaml), drop its model files."""
    if not directory.is_dir():
        return
    keep = {TRIAL_FILE, "report.json", "report.md", "report.html", "recipe.yaml"}
    for f in directory.iterdir():
        if f.name not in keep:
            shutil.rmtree(f) if f.is_dir() else f.unlink()


def pareto(points: list[tuple[float, float]], higher_is_better: bool = False) -> list[int]:
    """Indices of the points no other point beats on both quality (first, lower is better) and cost."""
    front = []
    for i, (q, c) in enumerate(points):
        cost = -c if higher_is_better else c
        dominated = any((q2 <= q and (-c2 if higher_is_better else c2) <= cost) and (q2 < q or (
            -c2 if higher_is_better else c2) < cost) for j, (q2, c2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _summarise(model: str, grid: str, out_dir: Path, trials: list[Trial], base: dict[str, Any],
               max_ppl: float | None,
               workers: int, address: str | None, trials_seconds: float, seconds: float,
               speed: str) -> dict[str, Any]:
    ok = [t for t in trials if t.status in ("ok", "cached")]
    fronts = {}
    for key, _label, higher in FRONTS:
        pts = [(t, (t.metrics.get("ppl_delta_pct"), (t.speed or {}).get(key) if key == "decode_tok_s"
                    else t.metrics.get(key))) for t in ok]
        pts = [(t, p) for t, p in pts if p[0] is not None and p[1] is not None]
        fronts[key] = sorted(pts[i][0].key for i in pareto([p for _, p in pts], higher))
    within = [t for t in ok if max_ppl is None or t.metrics["ppl_delta_pct"] <= max_ppl]
    best = min(within, key=lambda t: (t.metrics["weight_bytes"], t.metrics["ppl_delta_pct"]), default=None)
    return {
        "tool": {"name": "tokopt", "version": __version__}, "model": model, "grid": grid, "out": str(out_dir),
        "workers": workers, "ray_address": address, "speed": speed,
        "baseline": {k: base.get(k) for k in (*TRIAL_METRICS, "decode_tok_s", "prefill_tok_s")},
        "trials": [t.as_dict() for t in trials], "pareto": fronts, "max_ppl_increase": max_ppl,
        "best": None if best is None else {"key": best.key, "passes": best.passes, "metrics": best.metrics},
        "seconds": {"trials": round(trials_seconds, 3), "total": round(seconds, 3)},
        "counts": {s: sum(t.status == s for t in trials) for s in ("ok", "cached", "failed")},
    }


__all__ = ["expand_grid", "sweep", "run_trial", "pareto", "Trial"]
