"""tokopt's own version, for reports and artifact manifests (a leaf: every room may import it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokopt")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
