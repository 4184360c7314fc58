"""Where pass names resolve to pass classes.

Built-in passes are listed by import path and imported only when used, so listing
passes stays cheap.  Plugins add theirs through ``tokopt.plugins``.
"""

from __future__ import annotations

import importlib

from tokopt.optimizer.errors import PassOptionError
from tokopt.passes.base import Pass

BUILTIN_PASSES: dict[str, str] = {
    # name: "module:Class" — each built-in pass module adds its line here
}


def builtin_pass(name: str) -> type[Pass]:
    module, _, cls = BUILTIN_PASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def known_pass_names() -> list[str]:
    return sorted(BUILTIN_PASSES)


def get_pass_class(name: str) -> type[Pass]:
    if name in BUILTIN_PASSES:
        return builtin_pass(name)
    raise PassOptionError(f"unknown pass {name!r}; available passes: {', '.join(known_pass_names()) or 'none'}")
