"""The job behind ``tokopt bench``: speed of models and artifacts, several side by side, alternating."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tokopt.errors import BackendUnavailableError, UsageError
from tokopt.jobs.common import config_of, load_model
from tokopt.jobs.targets import genai_directory, open_target
from tokopt.measure.speed import SpeedConfig, current_rss_bytes, measure_speed, peak_rss_bytes
from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.ir.graph import Graph


def bench(model: str | Path | Graph, backend: str | None = None, *, speed_options: dict[str, Any] | None = None,
          load_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prefill/decode speed and peak memory of a model (reference executor, or lowered to
    ``backend`` in a temporary directory), of an artifact (with the backend that wrote it)
    or of an onnxruntime-genai directory another tool wrote (as is, on onnxruntime)."""
    result = compare([model], backend, speed_options=speed_options, load_options=load_options, rounds=1)
    return {**result["results"][0], "speed_config": result["speed_config"], "machine": result["machine"]}


def compare(models: list[str | Path | Graph], backend: str | None = None, *,
            speed_options: dict[str, Any] | None = None, load_options: dict[str, Any] | None = None,
            rounds: int = 3) -> dict[str, Any]:
    """Measure several models/artifacts side by side: every round measures each once, in turn.

    Alternating, in one process, is what makes a ratio trustworthy on a shared machine:
    load drift hits every contestant alike.  Each result holds the per-round values and
    their medians; ``ratio_vs_first`` divides every median decode tok/s by the first one's.

    Memory cannot be told apart in one process: with several targets, each result's
    ``peak_rss_bytes`` is None and ``loaded_rss_bytes`` says how much the resident set grew
    when that target was opened; ``process_peak_rss_bytes`` is the peak with all of them
    loaded.  One target alone keeps its own ``peak_rss_bytes``.
    """
    import contextlib
    import statistics

    from tokopt.measure.machine import describe_machine

    if not models:
        raise UsageError("nothing to benchmark: name at least one model or artifact")
    if rounds < 1:
        raise UsageError(f"rounds must be at least 1, got {rounds}")
    config: SpeedConfig = config_of(SpeedConfig, None, speed_options, "speed options")
    machine = describe_machine()
    with contextlib.ExitStack() as stack:
        opened, loaded = [], []
        for m in models:
            before = current_rss_bytes()
            opened.append(_bench_target(m, backend, load_options, machine, stack))
            loaded.append(max(current_rss_bytes() - before, 0))
        runs: list[list[dict[str, Any]]] = [[] for _ in opened]
        for _ in range(rounds):
            for i, (_, session, vocab) in enumerate(opened):
                runs[i].append(measure_speed(session, vocab, config))
    process_peak = peak_rss_bytes()
    results = []
    for (info, _, _), measured, grew in zip(opened, runs, loaded, strict=True):
        merged = dict(measured[-1])
        for key in ("prefill_tok_s", "decode_tok_s", "prefill_tok_s_batch", "decode_tok_s_batch", "decode_tok_s_peer"):
            if key in merged:
                merged[key] = statistics.median(m[key] for m in measured)
                merged[f"{key}_rounds"] = [m[key] for m in measured]
        merged["peak_rss_bytes"] = max(m["peak_rss_bytes"] for m in measured) if len(opened) == 1 else None
        merged["loaded_rss_bytes"] = grew
        results.append({**info, **merged})
    first = results[0]["decode_tok_s"]
    return {"results": results, "rounds": rounds, "process_peak_rss_bytes": process_peak,
            "ratio_vs_first": [r["decode_tok_s"] / first if first else None for r in results],
            "speed_config": config.as_dict(),
            "machine": {k: machine[k] for k in ("cpu", "cpu_count", "torch_threads", "memory_bandwidth_bytes_per_s")}}


def profile(model: str | Path | Graph, backend: str | None = None, *, steps: int = 32,
            load_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where a decode step's time goes on ``model``'s session, by op kind (:mod:`tokopt.measure.profile`)."""
    import contextlib

    from tokopt.backends.artifact import weight_file_bytes
    from tokopt.backends.onnxruntime.session import OnnxRuntimeSession
    from tokopt.measure.machine import describe_machine
    from tokopt.measure.profile import profile_decode

    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="tokopt-profile-") as tmp, contextlib.ExitStack() as stack:
        info, session, _ = _bench_target(model, backend, load_options, machine, stack)
        on_ort = isinstance(session, OnnxRuntimeSession)
        if on_ort:  # onnxruntime's profiler is a session option: the same model, opened again with it on
            session = session.profiled(str(Path(tmp) / "ort"))
        if "bytes_per_token" in info:
            weight_bytes, source = info["bytes_per_token"], "the bytes a decoded token reads (the IR's count)"
        else:
            directory = not isinstance(model, Graph) and Path(model).is_dir()
            weight_bytes, source = (weight_file_bytes(Path(model)) if directory else None), "every weight file byte"
        result = profile_decode(session, steps, onnxruntime=on_ort, weight_bytes=weight_bytes,
                                bandwidth=machine["memory_bandwidth_bytes_per_s"], bytes_source=source)
    return {**info, **result, "machine": {k: machine[k] for k in ("cpu", "cpu_count", "torch_threads")}}


def _bench_target(model: str | Path | Graph, backend: str | None, load_options: dict[str, Any] | None,
                  machine: dict[str, Any], stack: Any) -> tuple[dict[str, Any], Any, int]:
    """(what it is, a session to time, its vocabulary size); temporary lowerings live as long as ``stack``."""
    from tokopt.backends.artifact import is_artifact, read_manifest

    info: dict[str, Any] = {"model": str(model) if not isinstance(model, Graph) else model.meta.source}
    if not isinstance(model, Graph) and is_artifact(model):
        manifest = read_manifest(model)
        if backend and backend != manifest["backend"]:
            raise UsageError(f"{model} is a {manifest['backend']!r} artifact; it cannot be benchmarked with "
                             f"--backend {backend}")
        target = open_target(model, load_options)
        return {**info, "backend": manifest["backend"]}, target.session, target.vocab_size
    if not isinstance(model, Graph) and backend in (None, "onnxruntime") and genai_directory(model) is not None:
        target = open_target(model, load_options)
        return {**info, "backend": "onnxruntime (as is)"}, target.session, target.vocab_size
    graph = model if isinstance(model, Graph) else load_model(model)
    static = static_metrics(graph).as_dict()
    info.update({k: static[k] for k in ("params", "weight_bytes", "bits_per_param", "kv_bytes_per_token",
                                        "bytes_per_token")})
    info["decode_tok_s_bound"] = machine["memory_bandwidth_bytes_per_s"] / static["bytes_per_token"]
    if backend in (None, "reference"):
        from tokopt.optimizer.interpret import ReferenceExecutor

        return {**info, "backend": "reference"}, ReferenceExecutor(graph), graph.meta.vocab_size
    from tokopt.backends.registry import get_backend

    backend_obj = get_backend(backend)
    ok, why = backend_obj.availability()
    if not ok:
        raise BackendUnavailableError(f"backend {backend!r} cannot run here: {why}")
    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokopt-bench-"))) / "artifact"
    backend_obj.lower(graph, path)
    return {**info, "backend": backend}, backend_obj.load(path, **(load_options or {})), graph.meta.vocab_size
