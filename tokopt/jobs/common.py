"""What every job shares: progress bars, typed option sections, loading a model argument."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from tokopt.errors import RecipeError
from tokopt.optimizer.ir.graph import Graph


def make_progress(enabled: bool | None = None) -> Callable[..., Any]:
    """A tqdm wrapper, silent when stderr is not a terminal (CI logs stay readable)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()

    def progress(iterable: Any, desc: str = "", unit: str = "it", **kwargs: Any) -> Any:
        return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=not enabled, file=sys.stderr, **kwargs)

    return progress


def config_of(cls: type, section: dict[str, Any] | None, overrides: dict[str, Any] | None, what: str) -> Any:
    if section is not None and not isinstance(section, dict):
        raise RecipeError(f"{what}: expected a mapping of key: value, got {type(section).__name__}")
    values = {**(section or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(f"{what}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    try:
        config = cls(**{k: int(v) for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{what}: {exc}") from None
    may_be_zero = ("seed", "decode_tokens", "threads", "kv_context", "peer_decode_tokens")
    bad = [f"{k}={v}" for k, v in config.as_dict().items() if v < (0 if k in may_be_zero else 1)]
    if bad:
        raise RecipeError(f"{what}: {', '.join(bad)} must be positive")
    return config


def load_model(model: str | Path) -> Graph:
    from tokopt.frontends import load_model

    return load_model(model)
