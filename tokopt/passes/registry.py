"""Where pass names resolve to pass classes.

Built-in passes are listed by import path and imported only when used, so listing
passes stays cheap.  Plugins add theirs through ``tokopt.plugins``; this registry checks
that what a plugin names is a pass, since the plugin layer below cannot know.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokopt.errors import PassOptionError, PluginError
from tokopt.optimizer.pass_api import Pass
from tokopt.plugins import plugin_names, reserve_builtin_names, resolve_plugin, unknown_name_error

BUILTIN_PASSES: dict[str, str] = {
    # name: "module:Class" — each built-in pass module adds its line here
    "expert-prune": "tokopt.passes.expert_prune:ExpertPrunePass",
    "sparse-attention": "tokopt.passes.sparse_attention:SparseAttention",
    "gqa": "tokopt.passes.gqa:GroupedQueryAttention",
    "kv-layout": "tokopt.passes.kv_layout:KVLayout",
    "quantize": "tokopt.passes.quantize:QuantizePass",
}
reserve_builtin_names("pass", BUILTIN_PASSES)


def builtin_pass(name: str) -> type[Pass]:
    module, _, cls = BUILTIN_PASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def known_pass_names() -> list[str]:
    """Built-in and plugin pass names (plugin manifests are read; no plugin pass code is imported)."""
    return sorted(set(BUILTIN_PASSES) | set(plugin_names("pass")))


def get_pass_class(name: str) -> type[Pass]:
    """The class of pass ``name``; a plugin's class has ``plugin`` set to its distribution name."""
    if name in BUILTIN_PASSES:
        return builtin_pass(name)
    resolved = resolve_plugin("pass", name)
    if resolved is not None:
        return _plugin_pass_class(name, *resolved)
    broken = unknown_name_error("pass", name)
    if broken is not None:
        raise broken
    raise PassOptionError(f"unknown pass {name!r}; available passes: {', '.join(known_pass_names()) or 'none'}")


def _plugin_pass_class(name: str, cls: Any, plugin: str) -> type[Pass]:
    """Check what plugin ``plugin`` registered as pass ``name``, and mark it as the plugin's."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PluginError(f"plugin {plugin!r}: pass {name!r} resolves to {cls!r}, not a tokopt Pass subclass")
    if cls.name != name:
        raise PluginError(f"plugin {plugin!r} registers pass {name!r} but its class says name = {cls.name!r}")
    cls.plugin = plugin
    return cls
