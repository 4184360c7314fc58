"""Where pass names resolve to pass classes.

Built-in passes are listed by import path and imported only when used, so listing
passes stays cheap.  Plugins add theirs through ``tokopt.plugins``.
"""

from __future__ import annotations

import importlib

from tokopt.errors import PassOptionError
from tokopt.optimizer.pass_api import Pass

BUILTIN_PASSES: dict[str, str] = {
    # name: "module:Class" — each built-in pass module adds its line here
    "expert-prune": "tokopt.passes.expert_prune:ExpertPrunePass",
    "sparse-attention": "tokopt.passes.sparse_attention:SparseAttention",
    "gqa": "tokopt.passes.gqa:GroupedQueryAttention",
    "kv-layout": "tokopt.passes.kv_layout:KVLayout",
    "quantize": "tokopt.passes.quantize:QuantizePass",
}


def builtin_pass(name: str) -> type[Pass]:
    module, _, cls = BUILTIN_PASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def known_pass_names() -> list[str]:
    """Built-in and plugin pass names (plugin manifests are read; no plugin pass code is imported)."""
    from tokopt.plugins import plugin_names

    return sorted(set(BUILTIN_PASSES) | set(plugin_names("pass")))


def get_pass_class(name: str) -> type[Pass]:
    """The class of pass ``name``; a plugin's class has ``plugin`` set to its distribution name."""
    if name in BUILTIN_PASSES:
        return builtin_pass(name)
    from tokopt.plugins import plugin_pass_class, unknown_name_error

    cls = plugin_pass_class(name)
    if cls is not None:
        return cls
    broken = unknown_name_error("pass", name)
    if broken is not None:
        raise broken
    raise PassOptionError(f"unknown pass {name!r}; available passes: {', '.join(known_pass_names()) or 'none'}")
