"""Where backend names resolve to backend objects.

Built-in backends are listed by import path and imported only when used (the
onnxruntime and tensorrt modules are heavy); plugins add theirs through ``tokopt.plugins``.
A plugin backend is checked here and its methods are guarded so that a crash in any of
them names the plugin, wherever the backend is called from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tokopt.backends.base import Backend
from tokopt.backends.capabilities import refusals
from tokopt.errors import BackendUnavailableError, PluginError
from tokopt.optimizer.ir.graph import Graph
from tokopt.plugins import plugin_guard
from tokopt.plugins.registry import Registry

BUILTIN_BACKENDS: dict[str, str] = {
    # name: "module:Class" — each built-in backend package adds its line here
    "torch": "tokopt.backends.torch.backend:TorchBackend",
    "torch-compile": "tokopt.backends.torch.backend:TorchCompileBackend",
    "onnxruntime": "tokopt.backends.onnxruntime.backend:OnnxRuntimeBackend",
    "tensorrt": "tokopt.backends.tensorrt.backend:TensorRTBackend",
}

GUARDED_METHODS = ("availability", "capabilities", "check", "lower", "load")  # the Backend API a plugin implements


def backends_that_honour(graph: Graph) -> list[str]:
    """Every known backend whose capabilities hold ``graph`` (one that cannot even be created holds nothing)."""
    able = []
    for name in known_backend_names():
        try:
            if not refusals(graph, get_backend(name).capabilities()):
                able.append(name)
        except Exception:  # noqa: BLE001 - an unusable backend simply cannot
            continue
    return able


def _plugin_backend(name: str, cls: Any, plugin: str) -> Backend:
    """A new instance of what plugin ``plugin`` registered as backend ``name``, its methods guarded."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise PluginError(f"plugin {plugin!r}: backend {name!r} resolves to {cls!r}, not a tokopt Backend subclass")
    with plugin_guard(plugin, f"creating backend {name!r}"):
        backend = cls()
    backend.plugin = plugin
    for method in GUARDED_METHODS:
        setattr(backend, method, _guarded(getattr(backend, method), plugin, f"backend {name!r} {method}()"))
    return backend


def _guarded(fn: Callable[..., Any], plugin: str, what: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with plugin_guard(plugin, what):
            return fn(*args, **kwargs)
    return call


BACKENDS: Registry[Backend] = Registry("backend", BUILTIN_BACKENDS, adopt=_plugin_backend,
                                       unknown=BackendUnavailableError, make=lambda cls: cls())
builtin_backend = BACKENDS.get_builtin
known_backend_names = BACKENDS.names
get_backend = BACKENDS.get  # a plugin's has ``plugin`` set and its methods name the plugin when they crash
