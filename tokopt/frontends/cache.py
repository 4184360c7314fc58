"""The user cache directory (``$TOKOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/tokopt``)."""

from __future__ import annotations

import os
from pathlib import Path

from tokopt.io_boundary import env_directory

CACHE_ENV = "TOKOPT_CACHE_DIR"


def cache_dir() -> Path:
    """Where converted GGUF checkpoints and the bandwidth measurement are kept (a file there is refused)."""
    explicit = env_directory(CACHE_ENV)
    if explicit is not None:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokopt"
