"""A registry of one kind of named thing — built-ins by import path, then what plugins provide.

Passes and backends resolve names the same way: a built-in is imported only when used (so
listing stays cheap), a plugin's is resolved through the plugin manager and handed to the
registry's ``adopt`` (which checks its type: only the room above knows what a pass or a
backend is), and an unknown name is an error that lists the known ones — or names the
plugins that failed to load, since one of them may have provided it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from tokopt.errors import TokoptError
from tokopt.plugins import plugin_names, reserve_builtin_names, resolve_plugin, unknown_name_error

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind`` names → objects: ``builtin`` maps a name to ``"module:Attribute"``; ``make`` turns the
    attribute into what :meth:`get` returns; ``adopt(name, obj, plugin)`` does so for a plugin's object."""

    def __init__(self, kind: str, builtin: dict[str, str], *, adopt: Callable[[str, Any, str], T],
                 unknown: type[TokoptError], make: Callable[[Any], T] = lambda obj: obj) -> None:
        self.kind, self.builtin, self._adopt, self._unknown, self._make = kind, builtin, adopt, unknown, make
        reserve_builtin_names(kind, builtin)

    def names(self) -> list[str]:
        """Built-in and plugin names (plugin manifests are read; no plugin code is imported)."""
        return sorted(set(self.builtin) | set(plugin_names(self.kind)))

    def get_builtin(self, name: str) -> T:
        module, _, attr = self.builtin[name].partition(":")
        return self._make(getattr(importlib.import_module(module), attr))

    def get(self, name: str) -> T:
        if name in self.builtin:
            return self.get_builtin(name)
        resolved = resolve_plugin(self.kind, name)
        if resolved is not None:
            return self._adopt(name, *resolved)
        broken = unknown_name_error(self.kind, name)
        if broken is not None:
            raise broken
        plural = f"{self.kind}es" if self.kind.endswith("s") else f"{self.kind}s"
        raise self._unknown(f"unknown {self.kind} {name!r}; available {plural}: {', '.join(self.names()) or 'none'}")
