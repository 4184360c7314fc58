"""The one boundary where a reader's or a writer's failure becomes a :class:`~tokopt.errors.TokoptError`.

Build systems run tokopt unattended, so a corrupt input or an unwritable target must end in
one line that names the file, says what is wrong and what to do — never a traceback.  The
libraries that read the user's files report failures in their own types (safetensors'
``SafetensorError``, ``struct.error`` from a GGUF header, protobuf's ``DecodeError``, a pyo3
``PanicException`` from tokenizers, ``KeyError`` from a truncated graph, ``OSError``…), so
every reader runs inside :func:`reading`, every output location is probed by
:func:`probe_output_location` before any work, and :func:`output_failure` names what went
wrong while writing.  The original traceback is kept at debug level (``tokopt -vv``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tokopt.errors import InputFileError, OutputLocationError, SettingError, TokoptError

log = logging.getLogger(__name__)

#: Errors that are never tokopt's bug: the machine's storage said no.
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "code: 28", "disk quota exceeded")


def one_line(text: str, limit: int = 240) -> str:
    """``text`` on one line, at most ``limit`` characters (library messages span many)."""
    flat = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe(exc: BaseException) -> str:
    """``Type: message`` of a library exception, on one line."""
    message = one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@contextlib.contextmanager
def reading(path: str | Path, what: str, fix: str = "re-download or re-export it") -> Iterator[None]:
    """Run a reader of ``path``; whatever it raises (but a TokoptError or an interrupt) becomes an InputFileError.

    ``what`` names the kind of file (``"safetensors checkpoint"``), ``fix`` what the user can do.
    A ``PanicException`` from a Rust extension derives from ``BaseException``, hence the wide net.
    """
    try:
        yield
    except (TokoptError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - the boundary: every reader's failure is the user's file
        log.debug("reading %s failed", path, exc_info=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR):
            fix = "check the path and its permissions"
        raise InputFileError(f"{path}: cannot read this {what} ({describe(exc)}); it may be truncated or corrupt: "
                             f"{fix}") from exc


def output_failure(exc: BaseException, out: Path) -> OutputLocationError | None:
    """The :class:`OutputLocationError` that ``exc``, raised while writing ``out``, stands for; None if none.

    Storage errors (no space, quota, read-only filesystem) are recognised wherever they come from
    (torch's and safetensors' writers wrap ``ENOSPC`` in their own types); permission and path
    errors only when they concern ``out``'s directory, so a failure reading an input is not blamed on OUT.
    """
    if isinstance(exc, OutputLocationError):
        return exc
    storage = storage_failure(exc, out)
    if storage is not None:
        return storage
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename and _is_under(Path(filename), out.parent):
        return OutputLocationError(f"cannot write {filename} ({describe(exc)}); choose another -o or fix the "
                                   "directory's permissions")
    return None


def storage_failure(exc: BaseException, out: Path | None = None) -> OutputLocationError | None:
    """No space, a full quota or a read-only filesystem, wherever it was raised (None: ``exc`` is none of them)."""
    code = exc.errno if isinstance(exc, OSError) else None
    filename = getattr(exc, "filename", None)
    where = filename or out or "a file"
    text = str(exc).lower()
    if code in (errno.ENOSPC, errno.EDQUOT) or any(t in text for t in _NO_SPACE_TEXT):
        near = Path(filename).parent if filename else (out.parent if out is not None else None)
        free = _free_bytes(near) if near is not None else None
        left = f" ({free:,} bytes free there)" if free is not None else ""
        return OutputLocationError(f"no space left on the device while writing {where}{left}; free space or choose "
                                   "another -o (stage artifacts go to $TMPDIR)")
    if code == errno.EROFS:
        return OutputLocationError(f"{where} is on a read-only filesystem; choose another -o")
    return None


def probe_output_location(out: Path) -> None:
    """Fail now, not after an hour of work, when ``out`` could not be created.

    The nearest existing ancestor must be a directory in which a directory can really be made
    (a probe, created and removed at once: permissions, read-only mounts and root all answer truthfully).
    """
    ancestor = out.parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputLocationError(f"{ancestor} is not a directory (a file or a broken link is in the way), so "
                                  f"{out} cannot be created; choose another -o")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=ancestor)
    except OSError as exc:
        raise OutputLocationError(f"cannot create {out}: {ancestor} is not writable ({describe(exc)}); choose "
                                  "another -o or fix its permissions") from None
    os.rmdir(probe)


def make_parents(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, outermost first (to remove them on failure)."""
    missing: list[Path] = []
    current = path
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    missing.reverse()
    for directory in missing:
        try:
            directory.mkdir()
        except FileExistsError:  # another process made it meanwhile
            continue
        except OSError as exc:
            remove_empty(missing[: missing.index(directory)])
            raise OutputLocationError(f"cannot create {directory} ({describe(exc)}); choose another -o") from None
    return missing


def remove_empty(directories: list[Path]) -> None:
    """Remove directories :func:`make_parents` created, innermost first, where they are still empty."""
    for directory in reversed(directories):
        with contextlib.suppress(OSError):
            directory.rmdir()


def env_float(name: str, minimum: float = 0.0) -> float | None:
    """The ``TOKOPT_*`` variable ``name`` as a number above ``minimum`` (None when unset or empty)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > minimum or value == float("inf"):
        raise SettingError(f"${name}={raw!r} is not a number above {minimum:g}; set it to one (e.g. 2e10) or unset it")
    return value


def env_directory(name: str) -> Path | None:
    """The ``TOKOPT_*`` variable ``name`` as a directory path (None when unset); a file there is refused."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    if path.exists() and not path.is_dir():
        raise SettingError(f"${name}={raw!r} is not a directory; point it at a writable directory or unset it")
    return path


def _free_bytes(path: Path) -> int | None:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _is_under(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except (ValueError, OSError):
        return False


__all__ = ["reading", "output_failure", "storage_failure", "probe_output_location", "make_parents", "remove_empty",
           "env_float", "env_directory", "one_line", "describe"]
