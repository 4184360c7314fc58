"""Plugins: third-party passes, backends, frontends, ops and pipeline observers.

Plugin authors read :mod:`tokopt.plugins.hookspecs` (the manual) and import only
:data:`hookimpl` from here.  The rest of this module is what tokopt itself calls: the
registries resolve plugin names through it, and the pipeline notifies observers with
the ``notify_*`` functions, running plugin code inside :func:`plugin_guard`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokopt.errors import PluginError
from tokopt.optimizer.ir.ops import add_op_resolver
from tokopt.plugins.guard import plugin_guard
from tokopt.plugins.hookspecs import PLUGIN_API_VERSION, SUPPORTED_PLUGIN_API_VERSIONS, hookimpl, hookspec
from tokopt.plugins.manager import BUILTIN_NAMES, ENTRY_POINT_GROUP, PluginManager

if TYPE_CHECKING:
    from tokopt.optimizer.ir.graph import Graph

_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager; entry points are read on its first real use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def reset_plugin_manager(discover: bool = True) -> PluginManager:
    """Forget every loaded plugin (tests; after installing a plugin in-process)."""
    global _MANAGER
    _MANAGER = PluginManager(discover=discover)
    return _MANAGER


def register_plugin(plugin: Any, name: str) -> None:
    """Register ``plugin`` (an object or module with ``@hookimpl`` functions) in-process."""
    get_plugin_manager().register(plugin, name)


def unregister_plugin(name: str) -> None:
    get_plugin_manager().unregister(name)


# -- what the registries call ------------------------------------------------------------
def reserve_builtin_names(kind: str, names: Iterable[str]) -> None:
    """Keep plugins off the built-in ``names`` of ``kind`` ("pass", "backend", "frontend").

    The plugin layer sits below the registries and cannot import them, so each registry
    reserves its built-in names when it is imported; a plugin claiming one is set aside
    with a ``PluginError`` naming it.
    """
    BUILTIN_NAMES[kind].update(names)
    if _MANAGER is not None:
        _MANAGER.forget_provided()


def plugin_names(kind: str) -> list[str]:
    """Names of ``kind`` ("pass", "backend", "frontend") that plugins provide (nothing imported)."""
    return sorted(get_plugin_manager().provided(kind))


def resolve_plugin(kind: str, name: str) -> tuple[Any, str] | None:
    """``(object, plugin)`` behind the plugin-provided ``name``, imported now; None if no plugin has it.

    The registry that asked checks the object's type: only it knows what a pass or a
    backend is.  The providing plugin's ops are installed, so its graphs can be verified.
    """
    return get_plugin_manager().resolve(kind, name)


def unknown_name_error(kind: str, name: str) -> PluginError | None:
    """When ``name`` is unknown and some plugin failed to load: an error naming the broken plugins."""
    return get_plugin_manager().missing(kind, name)


def plugin_failures() -> dict[str, str]:
    """Plugins that could not be loaded: distribution name -> why."""
    return get_plugin_manager().failures()


def describe_plugins() -> list[dict[str, Any]]:
    """Installed plugins, what each provides, and why a broken one was set aside."""
    return get_plugin_manager().describe()


def install_plugin_ops() -> None:
    """Install every plugin's ops (called before reading a graph that may use them)."""
    get_plugin_manager().install_ops()


def op_lowering(backend: str, op: str) -> Any | None:
    """The lowering a plugin registered for ``op`` on ``backend`` (None if there is none)."""
    from tokopt.plugins import ops

    if ops.op_owner(op) is None:
        install_plugin_ops()
    return ops.op_lowering(backend, op)


add_op_resolver(lambda missing: install_plugin_ops())  # serialized graphs may name plugin ops


# -- pipeline observers: the pipeline calls these, in this order ----------------------------
def notify_pipeline_start(model: str, passes: list[str], backend: str | None, graph: Graph) -> None:
    get_plugin_manager().call("tokopt_pipeline_start", model=model, passes=list(passes), backend=backend, graph=graph)


def notify_stage_start(stage: str, index: int, graph: Graph) -> None:
    get_plugin_manager().call("tokopt_stage_start", stage=stage, index=index, graph=graph)


def notify_stage_end(stage: str, index: int, graph: Graph, metrics: dict[str, Any], notes: list[str]) -> None:
    get_plugin_manager().call("tokopt_stage_end", stage=stage, index=index, graph=graph, metrics=dict(metrics),
                              notes=list(notes))


class StageNotifier:
    """Forwards the pass manager's stage events to the plugins' ``tokopt_stage_*`` observers."""

    def stage_start(self, stage: str, index: int, graph: Graph) -> None:
        notify_stage_start(stage, index, graph)

    def stage_end(self, stage: str, index: int, graph: Graph, metrics: dict[str, Any], notes: list[str]) -> None:
        notify_stage_end(stage, index, graph, metrics, notes)


def notify_pipeline_end(report: dict[str, Any] | None, out_dir: Path | None, error: BaseException | None) -> None:
    get_plugin_manager().call("tokopt_pipeline_end", report=report, out_dir=out_dir, error=error)


__all__ = [
    "ENTRY_POINT_GROUP", "PLUGIN_API_VERSION", "SUPPORTED_PLUGIN_API_VERSIONS", "PluginError", "PluginManager",
    "hookimpl", "hookspec", "get_plugin_manager", "reset_plugin_manager", "register_plugin", "unregister_plugin",
    "reserve_builtin_names", "plugin_names", "resolve_plugin", "unknown_name_error", "plugin_failures",
    "describe_plugins", "install_plugin_ops", "op_lowering", "plugin_guard",
    "notify_pipeline_start", "notify_stage_start", "notify_stage_end", "notify_pipeline_end", "StageNotifier",
]
