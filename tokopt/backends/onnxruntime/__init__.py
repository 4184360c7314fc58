"""The onnxruntime backend: IR → ONNX (with onnxruntime's contrib fast paths) → session.

Heavy imports (onnx, onnxruntime) happen only when the backend is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeSession"]


def __getattr__(name: str) -> Any:
    if name == "OnnxRuntimeBackend":
        from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "OnnxRuntimeSession":
        from tokopt.backends.onnxruntime.session import OnnxRuntimeSession

        return OnnxRuntimeSession
    raise AttributeError(name)
