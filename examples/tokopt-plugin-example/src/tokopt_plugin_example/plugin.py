"""The plugin's manifest: what tokopt imports when it discovers the ``tokopt`` entry point.

It must stay light — tokopt imports it just to *list* passes — so it names the passes and
the op by reference and never imports the modules behind them.
"""

from __future__ import annotations

from tokopt.plugins import hookimpl


@hookimpl
def tokopt_plugin_api_version() -> int:
    return 1


@hookimpl
def tokopt_register_passes() -> dict[str, str]:
    return {
        "prune-layers": "tokopt_plugin_example.prune_layers:PruneLayers",
        "logit-softcap": "tokopt_plugin_example.softcap:SoftcapLogits",
    }


@hookimpl
def tokopt_register_ops() -> list[str]:
    return ["tokopt_plugin_example.softcap:LOGIT_SOFTCAP"]
