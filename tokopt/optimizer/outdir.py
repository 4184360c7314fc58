"""Atomic output directories: everything is written beside OUT, then renamed into place.

A build system reading OUT must never see half a result: either the whole directory
(artifact, reports, recipe) appears at once, or nothing does.  The temporary directory
lives next to OUT (same filesystem, so the final ``rename`` is atomic) and is removed on
any failure.  An existing OUT is refused unless ``force`` is given; then it is replaced
only after the new one is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokopt.optimizer.errors import OutputExistsError

log = logging.getLogger(__name__)


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing OUT (unless ``force``) before any expensive work."""
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out} exists; choose another -o/--out or pass --force to replace it")
        if not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory; remove it or choose another -o/--out")
    if out.parent.exists() and not out.parent.is_dir():
        raise OutputExistsError(f"{out.parent} is not a directory; choose another -o/--out")


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes ``out``, on failure it is deleted."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`; OUT itself appears only when complete
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        commit(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit(tmp: Path, out: Path, force: bool) -> None:
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an output directory is normally shared
    if out.exists():
        check_output(out, force)
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(trash / out.name, out)  # put the old one back
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    log.info("wrote %s", out)


__all__ = ["atomic_directory", "check_output", "commit"]
