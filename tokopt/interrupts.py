"""SIGINT and SIGTERM unwind the stack like an exception, so every ``with`` cleans up on the way out.

Python's default SIGTERM ends the process on the spot: no ``finally`` runs, so the temporary
sibling of OUT, the stage directories in ``$TMPDIR`` and the speed-measurement child would be
left behind.  Inside :func:`unwinding_on_signals` both signals raise
:class:`~tokopt.errors.Interrupted` (a ``KeyboardInterrupt``) in the main thread instead;
``atomic_directory`` and ``TemporaryDirectory`` remove what they made, ``subprocess.run`` kills
its child, and the CLI exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).  Only the first
signal raises: later ones (an impatient second Ctrl-C) are ignored while the cleanup runs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from tokopt.errors import Interrupted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[Interrupted] = []  # the signal that arrived inside the current block, if one did
_deferring: list[bool] = []  # non-empty inside deferred_interrupts(): the handler records, it does not raise


def interrupted() -> Interrupted | None:
    """The interrupt that arrived inside :func:`unwinding_on_signals`, even one a library swallowed; else None."""
    return _received[0] if _received else None


def raise_if_interrupted() -> None:
    """Raise the interrupt that arrived (and was swallowed on its way up), if one did."""
    received = interrupted()
    if received is not None:
        raise Interrupted(received.signum, received.signal_name)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A block no interrupt may cut in half: a signal arriving inside is raised when the block ends.

    Starting a child process is such a block: an exception raised between the fork and the
    caller holding the ``Popen`` object would leave a child nobody kills.
    """
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    raise_if_interrupted()


@contextlib.contextmanager
def unwinding_on_signals() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM raise :class:`Interrupted`; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():  # signals are only delivered to the main thread
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _received.clear()

    def handler(signum: int, frame: Any) -> None:
        if _received:
            log.warning("%s while stopping: still cleaning up", signal.Signals(signum).name)
            return
        _received.append(Interrupted(signum, signal.Signals(signum).name))
        if not _deferring:
            raise Interrupted(signum, signal.Signals(signum).name)

    for sig in SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    except BaseException as exc:
        received = interrupted()
        if received is None or isinstance(exc, Interrupted):
            raise
        log.debug("%s arrived and was turned into %r on its way up", received.signal_name, exc, exc_info=True)
        raise Interrupted(received.signum, received.signal_name) from exc
    finally:
        _received.clear()
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["unwinding_on_signals", "deferred_interrupts", "interrupted", "raise_if_interrupted", "SIGNALS"]
