"""Pinning a failure on the plugin that caused it.

Every piece of plugin code tokopt runs — a hook, an imported reference, a pass, a
backend method, an op lowering — runs inside :func:`plugin_guard` or through
:func:`import_reference`, so a crash surfaces as a ``PluginError`` whose message names the
distribution, not as a bare traceback the user cannot attribute.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

from tokopt.errors import PluginError, TokoptError

BUILTIN = "tokopt"  # the value of ``plugin`` on built-in passes and backends


@contextlib.contextmanager
def plugin_guard(plugin: str, what: str) -> Iterator[None]:
    """Turn a crash inside plugin code into a ``PluginError`` naming the plugin.

    ``TokoptError`` subclasses raised by the plugin (a bad option, an unmet precondition)
    pass through unchanged: they are deliberate messages for the user.  For built-in code
    (``plugin == "tokopt"``) nothing is wrapped, so tokopt's own bugs keep their traceback.
    """
    try:
        yield
    except TokoptError:
        raise
    except Exception as exc:
        if plugin == BUILTIN:
            raise
        err = PluginError(f"plugin {plugin!r} crashed in {what}: {type(exc).__name__}: {exc}")
        err.plugin = plugin  # type: ignore[attr-defined]
        raise err from exc


def import_reference(ref: Any, plugin: str, what: str) -> Any:
    """``"pkg.mod:Attr"`` → the object (objects pass through); errors name ``plugin``."""
    if not isinstance(ref, str):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"plugin {plugin!r}: {what} reference {ref!r} is not of the form 'module:Attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - any failure importing plugin code is the plugin's
        raise PluginError(f"plugin {plugin!r}: cannot import {what} {ref!r}: {type(exc).__name__}: {exc}") from exc
    return obj
