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


@contextlib.contextmanager
def unwinding_on_signals() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM raise :class:`Interrupted`; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():  # signals are only delivered to the main thread
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if fired:
            log.warning("%s while stopping: still cleaning up", signal.Signals(signum).name)
            return
        fired = True
        raise Interrupted(signum, signal.Signals(signum).name)

    for sig in SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["unwinding_on_signals", "SIGNALS"]
