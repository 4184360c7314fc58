"""The TensorRT backend: an engine built by TensorRT's own ONNX parser from tokopt's ONNX.

Nothing here imports ``tensorrt`` (or CUDA) at module import time, so ``tokopt backends``
can say why TensorRT is not usable on a machine without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TensorRTBackend"]


def __getattr__(name: str) -> Any:
    if name == "TensorRTBackend":
        from tokopt.backends.tensorrt.backend import TensorRTBackend

        return TensorRTBackend
    raise AttributeError(name)
