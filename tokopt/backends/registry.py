"""Where backend names resolve to backend objects.

Built-in backends are listed by import path and imported only when used (the
onnxruntime and tensorrt modules are heavy); plugins add theirs through ``tokopt.plugins``.
"""

from __future__ import annotations

import importlib

from tokopt.backends.base import Backend
from tokopt.errors import BackendUnavailableError

BUILTIN_BACKENDS: dict[str, str] = {
    # name: "module:Class" — each built-in backend package adds its line here
    "torch": "tokopt.backends.torch.backend:TorchBackend",
    "onnxruntime": "tokopt.backends.onnxruntime.backend:OnnxRuntimeBackend",
    "tensorrt": "tokopt.backends.tensorrt.backend:TensorRTBackend",
}


def builtin_backend(name: str) -> Backend:
    module, _, cls = BUILTIN_BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def known_backend_names() -> list[str]:
    """Built-in and plugin backend names (plugin manifests are read; no backend code is imported)."""
    from tokopt.plugins import plugin_names

    return sorted(set(BUILTIN_BACKENDS) | set(plugin_names("backend")))


def backend_capabilities() -> dict[str, dict]:
    """What every known backend can express (a backend that cannot even be created expresses nothing)."""
    out: dict[str, dict] = {}
    for name in known_backend_names():
        try:
            out[name] = get_backend(name).capabilities()
        except Exception:  # noqa: BLE001 - an unusable backend simply cannot do it
            out[name] = {}
    return out


def get_backend(name: str) -> Backend:
    """A backend instance; a plugin's has ``plugin`` set and its methods name the plugin when they crash."""
    if name in BUILTIN_BACKENDS:
        return builtin_backend(name)
    from tokopt.plugins import plugin_backend, unknown_name_error

    backend = plugin_backend(name)
    if backend is not None:
        return backend
    broken = unknown_name_error("backend", name)
    if broken is not None:
        raise broken
    raise BackendUnavailableError(
        f"unknown backend {name!r}; available backends: {', '.join(known_backend_names()) or 'none'}")
