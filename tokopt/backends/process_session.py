"""An artifact's session in a fresh process, driven over a pipe.

The parity check of a model past the memory budget cannot load the artifact beside the
graph it came from: a 7B model's int4 graph and onnxruntime's copy of the same weights
would hold the optimizer's process at twice the model.  :class:`ProcessSession` loads the
artifact in a child process (``python -m tokopt.backends.process_session``: what a
deployment would load, with memory of its own) and offers the two calls the parity check
makes (``new_cache``, ``forward``), so :func:`~tokopt.backends.parity.check_parity` runs
unchanged against it.  Requests and answers are pickled over the child's stdin and stdout
(the child's own prints go to its stderr); the child is tokopt's own, so unpickling is safe.
"""

from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import torch

from tokopt.errors import TokoptError
from tokopt.interrupts import deferred_interrupts

STOP_SECONDS = 30  # a child that does not leave when asked is killed


def _serve(backend: str, path: str, requests: IO[bytes], answers: IO[bytes]) -> None:
    """The child: load the artifact, then answer ``new_cache``, ``forward`` and ``peak_rss`` until the pipe closes."""

    def answer(status: str, value: Any) -> None:
        pickle.dump((status, value), answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()

    try:
        from tokopt.backends.base import new_cache
        from tokopt.backends.registry import get_backend

        session = get_backend(backend).load(Path(path))
        caches: list[Any] = []
        answer("ok", None)
        while True:
            try:
                kind, args = pickle.load(requests)
            except EOFError:
                return
            if kind == "new_cache":
                caches.append(new_cache(session, *args))
                answer("ok", len(caches) - 1)
            elif kind == "peak_rss":
                answer("ok", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            else:
                ids, cache = args
                logits = session.forward(torch.from_numpy(ids), caches[cache] if cache is not None else None)
                answer("ok", logits.float().numpy())
    except Exception as exc:  # noqa: BLE001 - whatever failed is reported to the parent, which raises it
        answer("error", f"{type(exc).__name__}: {exc}")


class ProcessSession:
    """A backend's session for the artifact at ``path``, running in a child process."""

    def __init__(self, backend: str, path: Path) -> None:
        self._label = f"the {backend} artifact at {path}"
        self._stderr = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "tokopt.backends.process_session", backend, str(path)]
        with deferred_interrupts():  # a signal between the fork and the assignment would orphan the child
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        try:
            self._answer()
        except BaseException:
            self.close()
            raise

    def _answer(self) -> Any:
        assert self._proc.stdout is not None
        try:
            status, value = pickle.load(self._proc.stdout)
        except EOFError:
            code = self._proc.wait(STOP_SECONDS)
            self._stderr.seek(0)
            tail = " | ".join(self._stderr.read().decode(errors="replace").strip().splitlines()[-3:])
            raise TokoptError(f"{self._label}: its session process ended (exit {code}): {tail}") from None
        if status != "ok":
            raise TokoptError(f"{self._label}: its session process failed: {value}")
        return value

    def _ask(self, kind: str, args: Any) -> Any:
        assert self._proc.stdin is not None
        pickle.dump((kind, args), self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self._proc.stdin.flush()
        return self._answer()

    def new_cache(self, batch: int = 1, length: int | None = None) -> int:
        return self._ask("new_cache", (batch, length))

    def forward(self, input_ids: torch.Tensor, cache: int | None = None) -> torch.Tensor:
        return torch.from_numpy(self._ask("forward", (input_ids.to(torch.int64).contiguous().numpy(), cache)))

    def peak_rss_bytes(self) -> int:
        """The child's peak resident set so far: what loading and running the artifact cost, on its own."""
        return int(self._ask("peak_rss", None))

    def close(self) -> None:
        """Close the pipe (the child leaves); kill it if it does not, and reap it either way."""
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        try:
            self._proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        except BaseException:  # an interrupt while waiting: the child goes too
            self._proc.kill()
            self._proc.wait()
            raise
        finally:
            self._stderr.close()

    def __enter__(self) -> ProcessSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    """``python -m tokopt.backends.process_session BACKEND PATH``: serve on stdin/stdout."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything printed goes to stderr, not into the protocol
    _serve(sys.argv[1], sys.argv[2], sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
