"""The onnxruntime backend: IR → ONNX (with onnxruntime's contrib fast paths) → session.

Heavy imports (onnx, onnxruntime) happen only when the backend is used.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeSession", "import_onnxruntime"]


def import_onnxruntime() -> ModuleType:
    """``onnxruntime``, imported with its telemetry off unless the user set ``ORT_DISABLE_TELEMETRY``.

    On import it otherwise writes a session id to ``$TMPDIR/.ses``: a build step must leave nothing
    behind in the temp directory (and send nothing anywhere).
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


def __getattr__(name: str) -> Any:
    if name == "OnnxRuntimeBackend":
        from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "OnnxRuntimeSession":
        from tokopt.backends.onnxruntime.session import OnnxRuntimeSession

        return OnnxRuntimeSession
    raise AttributeError(name)
