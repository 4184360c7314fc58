"""Architectures that plugins add to the HF frontend, imported only when a checkpoint needs one.

The plugin layer sits below the frontends and cannot register builders itself; the
frontend asks it for the plugin ``model_type`` names and stands a :class:`PluginBuilder`
in for each until a checkpoint of that type is loaded.
"""

from __future__ import annotations

from tokopt.errors import UnsupportedArchitectureError
from tokopt.frontends.hf.builder import HFSource
from tokopt.optimizer.ir.graph import Graph
from tokopt.plugins import plugin_guard, resolve_plugin


class PluginBuilder:
    """A builder that imports the plugin's real builder on first call and names the plugin in the history."""

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type

    def __call__(self, src: HFSource) -> Graph:
        resolved = resolve_plugin("frontend", self.model_type)
        if resolved is None:
            raise UnsupportedArchitectureError(f"the plugin that provided architecture {self.model_type!r} "
                                               "is no longer registered")
        builder, plugin = resolved
        with plugin_guard(plugin, f"frontend for model_type {self.model_type!r}"):
            graph = builder(src)
        if graph.history:
            graph.history[-1] = f"{graph.history[-1]} (plugin {plugin})"
        return graph
