"""The plugin's manifest: what tokopt imports when it discovers the ``tokopt`` entry point.

It must stay light — tokopt imports it just to *list* passes — so it names the pass by
reference and never imports the pass module itself.
"""

from __future__ import annotations

from tokopt.plugins import hookimpl


@hookimpl
def tokopt_plugin_api_version() -> int:
    return 1


@hookimpl
def tokopt_register_passes() -> dict[str, str]:
    return {"prune-layers": "tokopt_plugin_example.prune_layers:PruneLayers"}
