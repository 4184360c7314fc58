"""Where backend names resolve to backend objects.

Built-in backends are listed by import path and imported only when used (the
onnxruntime and tensorrt modules are heavy); plugins add theirs through ``tokopt.plugins``.
"""

from __future__ import annotations

import importlib

from tokopt.backends.base import Backend
from tokopt.optimizer.errors import BackendUnavailableError

BUILTIN_BACKENDS: dict[str, str] = {
    # name: "module:Class" — each built-in backend package adds its line here
}


def builtin_backend(name: str) -> Backend:
    module, _, cls = BUILTIN_BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def known_backend_names() -> list[str]:
    return sorted(BUILTIN_BACKENDS)


def get_backend(name: str) -> Backend:
    if name in BUILTIN_BACKENDS:
        return builtin_backend(name)
    raise BackendUnavailableError(
        f"unknown backend {name!r}; available backends: {', '.join(known_backend_names()) or 'none'}")
