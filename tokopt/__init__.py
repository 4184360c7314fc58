"""tokopt: a compiler for the inference cost of language models.

The Python API mirrors the CLI::

    import tokopt
    graph = tokopt.load("smollm2")          # HF dir, hub id, .gguf or demo name
    print(tokopt.static_metrics(graph))      # params, weight bytes, KV bytes/token, FLOPs
    ids = tokopt.generate(graph, "The capital of France is", max_new_tokens=16)
    result = tokopt.optimize("smollm2", "quantize:bits=8", backend="torch", out="out")  # = tokopt optimize
    print(result.report["stages"][-1]["metrics"]["ppl_delta_pct"], result.passed)
    tokopt.evaluate("out")["ppl"]                                                      # = tokopt eval
    tokopt.bench("out")["decode_tok_s"]                                                # = tokopt bench
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from tokopt.frontends import load_model as load
from tokopt.optimizer import Graph, TokoptError, static_metrics, verify
from tokopt.optimizer.gates import Gates
from tokopt.optimizer.optimize import OptimizeResult, bench, evaluate, optimize
from tokopt.optimizer.pipeline import Pipeline, parse_passes

try:
    __version__ = version("tokopt")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "load", "Graph", "TokoptError", "static_metrics", "verify", "optimize", "evaluate", "bench",
           "OptimizeResult", "Gates", "Pipeline", "parse_passes"]
