"""tokopt: a compiler for the inference cost of language models.

The Python API mirrors the CLI::

    import tokopt
    graph = tokopt.load("smollm2")          # HF dir, hub id, .gguf or demo name
    print(tokopt.static_metrics(graph))      # params, weight bytes, KV bytes/token, FLOPs
    print(tokopt.generate(graph, "The capital of France is", max_new_tokens=16).text)  # = tokopt generate
    result = tokopt.optimize("smollm2", "quantize:bits=8", backend="torch", out="out")  # = tokopt optimize
    print(result.report["stages"][-1]["metrics"]["ppl_delta_pct"], result.passed)
    tokopt.evaluate("out")["ppl"]                                                      # = tokopt eval
    tokopt.bench("out")["decode_tok_s"]                                                # = tokopt bench
    tokopt.compare(["out", "smollm2"], rounds=3)["ratio_vs_first"]                     # = tokopt bench A B
    tokopt.Pipeline.parse("quantize:bits=8").run(graph)                                # passes, no measurement
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tokopt.version import __version__

if TYPE_CHECKING:
    from tokopt.frontends import load_model as load
    from tokopt.jobs.bench import bench, compare
    from tokopt.jobs.evaluate import evaluate
    from tokopt.jobs.generate import generate_text as generate
    from tokopt.jobs.optimize import OptimizeResult, optimize
    from tokopt.measure.gates import Gates
    from tokopt.optimizer import Graph, TokoptError, static_metrics, verify
    from tokopt.passes.pipeline import Pipeline, parse_passes

# Imported on first use (PEP 562): ``import tokopt`` stays cheap for the processes that need one corner of it
# (``python -m tokopt.measure.speed`` times an artifact in a fresh process twice per optimize run, and the
# frontends pull in transformers, ~1.5 s).
_API = {
    "load": ("tokopt.frontends", "load_model"), "bench": ("tokopt.jobs.bench", "bench"),
    "compare": ("tokopt.jobs.bench", "compare"), "evaluate": ("tokopt.jobs.evaluate", "evaluate"),
    "generate": ("tokopt.jobs.generate", "generate_text"), "optimize": ("tokopt.jobs.optimize", "optimize"),
    "OptimizeResult": ("tokopt.jobs.optimize", "OptimizeResult"), "Gates": ("tokopt.measure.gates", "Gates"),
    "Graph": ("tokopt.optimizer", "Graph"), "TokoptError": ("tokopt.optimizer", "TokoptError"),
    "static_metrics": ("tokopt.optimizer", "static_metrics"), "verify": ("tokopt.optimizer", "verify"),
    "Pipeline": ("tokopt.passes.pipeline", "Pipeline"), "parse_passes": ("tokopt.passes.pipeline", "parse_passes"),
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'tokopt' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", "load", "Graph", "TokoptError", "static_metrics", "verify", "optimize", "evaluate", "bench",
           "compare", "generate", "OptimizeResult", "Gates", "Pipeline", "parse_passes"]
