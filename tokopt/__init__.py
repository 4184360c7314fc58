"""tokopt: a compiler for the inference cost of language models.

The Python API mirrors the CLI::

    import tokopt
    graph = tokopt.load("smollm2")          # HF dir, hub id, .gguf or demo name
    print(tokopt.static_metrics(graph))      # params, weight bytes, KV bytes/token, FLOPs
    ids = tokopt.generate(graph, "The capital of France is", max_new_tokens=16)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from tokopt.frontends import load_model as load
from tokopt.optimizer import Graph, TokoptError, static_metrics, verify

try:
    __version__ = version("tokopt")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "load", "Graph", "TokoptError", "static_metrics", "verify"]
