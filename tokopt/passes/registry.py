"""Where pass names resolve to pass classes.

Built-in passes are listed by import path and imported only when used, so listing
passes stays cheap.  Plugins add theirs through ``tokopt.plugins``; this registry checks
that what a plugin names is a pass, since the plugin layer below cannot know.
"""

from __future__ import annotations

from typing import Any

from tokopt.errors import PassOptionError, PluginError
from tokopt.optimizer.pass_api import Pass
from tokopt.plugins.registry import Registry

BUILTIN_PASSES: dict[str, str] = {
    # name: "module:Class" — each built-in pass module adds its line here
    "expert-prune": "tokopt.passes.expert_prune:ExpertPrunePass",
    "sparse-attention": "tokopt.passes.sparse_attention:SparseAttention",
    "gqa": "tokopt.passes.gqa:GroupedQueryAttention",
    "kv-layout": "tokopt.passes.kv_layout:KVLayout",
    "quantize": "tokopt.passes.quantize:QuantizePass",
}
def _plugin_pass_class(name: str, cls: Any, plugin: str) -> type[Pass]:
    """Check what plugin ``plugin`` registered as pass ``name``, and mark it as the plugin's."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PluginError(f"plugin {plugin!r}: pass {name!r} resolves to {cls!r}, not a tokopt Pass subclass")
    if cls.name != name:
        raise PluginError(f"plugin {plugin!r} registers pass {name!r} but its class says name = {cls.name!r}")
    cls.plugin = plugin
    return cls


PASSES: Registry[type[Pass]] = Registry("pass", BUILTIN_PASSES, adopt=_plugin_pass_class, unknown=PassOptionError)
builtin_pass = PASSES.get_builtin
known_pass_names = PASSES.names
get_pass_class = PASSES.get  # a plugin's class has ``plugin`` set to its distribution name
