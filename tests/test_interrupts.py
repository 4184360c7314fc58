"""SIGINT and SIGTERM stop a real ``tokopt optimize`` in one line, and nothing it made survives.

Each case starts ``python -m tokopt -v optimize`` on a tiny llama (``quantize:bits=8`` lowered to
onnxruntime, speed measured on every stage's artifact, so there are stage directories in
``$TMPDIR``, OUT's temporary sibling and speed-measurement child processes), waits until the run
has reached a given point — a log line, a stage directory, a live measurement child, the final
artifact written beside OUT — and only then signals it.  Waiting for a marker instead of sleeping
makes the interrupt land where it is meant to; a point whose window is milliseconds on a tiny model
(the backend writing its files beside OUT's temporary sibling) runs on a slow disk, simulated in
the child by holding each ``model.onnx`` write for a second; should the run still finish before the signal
arrives (a loaded machine), the case is tried again, and it fails unless one attempt really was
interrupted (exit ``128 + signal`` and the ``interrupted by`` line).

After the run: the exit code is 130 (SIGINT) or 143 (SIGTERM); stderr ends in one ``error: …
interrupted …`` line with no traceback; OUT's parent directory is as empty as it was (no OUT, no
``.OUT.tmp-*``), ``$TMPDIR`` holds nothing the run made, and no process that inherited the run's
environment is still alive (children found by a marker variable, so an orphan reparented to init
is found too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

ENV_MARK = "TOKOPT_INTERRUPT_TEST_RUN"
SPEED_CHILD = "tokopt.measure.speed"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("interrupt_recipe") / "small.yaml"
    path.write_text("eval: {sequences: 1, seq_len: 16, calib_sequences: 1, calib_seq_len: 16}\n"
                    "speed: {prompt_len: 8, decode_tokens: 4, batch_size: 1}\n")
    return path


@dataclass
class Run:
    """What a marker can look at while the run is going."""

    proc: subprocess.Popen
    tmpdir: Path
    out: Path
    stderr: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def stage_dirs(self) -> list[Path]:
        return sorted(self.tmpdir.glob("tokopt-stage-*"))

    def out_siblings(self) -> list[Path]:
        return sorted(self.out.parent.glob(f".{self.out.name}.tmp-*"))

    def nested_tmp(self) -> list[Path]:  # the backend's own atomic directory, made beside OUT's temporary sibling
        return sorted(self.out.parent.glob(f"..{self.out.name}.tmp-*.tmp-*"))

    def speed_child(self) -> bool:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return False
        for child in children:
            try:
                if SPEED_CHILD in " ".join(child.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    def final_artifact_written(self) -> bool:
        return any((s / "tokopt_artifact.json").is_file() for s in self.out_siblings() if s not in self.nested_tmp())


# The child as on a slow disk: each model.onnx write held for a second once written (a tiny model's takes ms).
SLOW_DISK = ("import time\n"
             "import tokopt.backends.onnxruntime.external_data as ed\n"
             "write = ed.write_model\n"
             "def slow(*args, **kwargs):\n"
             "    files = write(*args, **kwargs)\n"
             "    time.sleep(1.0)\n"
             "    return files\n"
             "ed.write_model = slow\n"
             "import runpy\n"
             "runpy.run_module('tokopt', run_name='__main__')\n")

# The points at which the run is signalled: (id, signal, whole process group?, marker).
POINTS: list[tuple[str, int, bool, Callable[[Run], bool]]] = [
    ("sigint-after-load", signal.SIGINT, False, lambda r: any(" loaded " in line for line in r.stderr)),
    ("sigint-stage-dir", signal.SIGINT, False, lambda r: bool(r.stage_dirs()) and bool(r.out_siblings())),
    ("sigint-speed-child", signal.SIGINT, False, lambda r: bool(r.stage_dirs()) and r.speed_child()),
    ("sigint-lowering-beside-out", signal.SIGINT, False, lambda r: bool(r.nested_tmp())),
    ("ctrl-c-group-final-speed-child", signal.SIGINT, True,
     lambda r: r.final_artifact_written() and r.speed_child()),
    ("sigterm-speed-child", signal.SIGTERM, False, lambda r: bool(r.stage_dirs()) and r.speed_child()),
]
SLOW_DISK_POINTS = {"sigint-lowering-beside-out"}
ATTEMPTS = 3


def _start(model: Path, recipe: Path, root: Path, mark: str, slow_disk: bool) -> Run:
    tmpdir, parent = root / "tmp", root / "outparent"
    tmpdir.mkdir(parents=True)
    parent.mkdir()
    inherited = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # tokopt must set it itself
    env = {**inherited, "TMPDIR": str(tmpdir), ENV_MARK: mark, "PYTHONUNBUFFERED": "1"}
    entry = ["-c", SLOW_DISK] if slow_disk else ["-m", "tokopt"]
    cmd = [sys.executable, *entry, "-v", "optimize", str(model), "--passes", "quantize:bits=8",
           "--backend", "onnxruntime", "--recipe", str(recipe), "--speed", "artifact", "-o", str(parent / "out")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run = Run(proc, tmpdir, parent / "out")

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            run.stderr.append(line.rstrip("\n"))

    run.reader = threading.Thread(target=drain, daemon=True)
    run.reader.start()
    return run


def _processes_marked(mark: str) -> list[psutil.Process]:
    """Live processes that inherited this run's marker variable (zombies are dead already)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(ENV_MARK) == mark:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} (parent {p.ppid()}, {p.status()}): {' '.join(p.cmdline())}"
    except psutil.Error as exc:
        return f"pid {p.pid}: {exc!r}"


def _attempt(model: Path, recipe: Path, root: Path, sig: int, group: bool,
             marker: Callable[[Run], bool], slow_disk: bool) -> tuple[Run, bool]:
    """One run signalled at ``marker``; returns it (finished) and whether the signal was sent before it ended."""
    mark = uuid.uuid4().hex
    run = _start(model, recipe, root, mark, slow_disk)
    sent = False
    deadline = time.monotonic() + 240
    try:
        while run.proc.poll() is None and time.monotonic() < deadline:
            if marker(run):
                if group:  # Ctrl-C in a terminal: the whole foreground process group gets SIGINT
                    os.killpg(run.proc.pid, sig)
                else:
                    os.kill(run.proc.pid, sig)
                sent = True
                break
            time.sleep(0.01)
        run.proc.wait(timeout=120)
    finally:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
    assert run.reader is not None
    run.reader.join(timeout=30)  # stderr's end: every line the run wrote has been read
    survivors = _processes_marked(mark)
    described = [_describe(p) for p in survivors]
    for p in survivors:
        p.kill()
    assert not survivors, f"processes outlived the run: {described}"
    return run, sent


@pytest.mark.parametrize("point, sig, group, marker", POINTS, ids=[p[0] for p in POINTS])
def test_interrupt_exits_in_one_line_and_leaves_nothing(small_llama, recipe, tmp_path, point, sig, group, marker):
    tries = []
    for attempt in range(ATTEMPTS):
        run, sent = _attempt(small_llama, recipe, tmp_path / f"attempt{attempt}", sig, group, marker,
                             slow_disk=point in SLOW_DISK_POINTS)
        code = run.proc.returncode
        tries.append((sent, code))
        if sent and code == 128 + sig:
            break
        # Signalled too late (the run had finished), or the marker never showed: only a finished run is retried.
        assert code == 0, f"exit {code} (signal sent: {sent}):\n" + "\n".join(run.stderr[-20:])
    else:
        pytest.fail(f"{point}: no attempt was interrupted (signal sent, exit code) per attempt: {tries}")

    name = signal.Signals(sig).name
    err = "\n".join(run.stderr)
    assert "Traceback" not in err, err
    last = run.stderr[-1]
    assert last.startswith("error: ") and f"interrupted by {name}" in last, err
    assert last == f"error: interrupted by {name}; stopped, and everything this run had made was removed"
    assert sum(line.startswith("error:") for line in run.stderr) == 1, err
    # Nothing left beside OUT (no OUT, no .OUT.tmp-*, no .OUT.probe-*), nothing the run made in $TMPDIR.
    assert sorted(os.listdir(run.out.parent)) == [], os.listdir(run.out.parent)
    assert not os.listdir(run.tmpdir), os.listdir(run.tmpdir)  # onnxruntime's telemetry file (.ses) included


# -- in process: an interrupt a library swallows still ends the run as an interrupt ---------------------
def _swallowing_library() -> None:
    """Like torch reading a tensor from a Python object: the callback's exception becomes the library's own."""
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, raising Interrupted
        time.sleep(1)
    except KeyboardInterrupt as exc:
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from exc


def test_an_interrupt_turned_into_another_error_leaves_the_block_as_the_interrupt():
    from tokopt.errors import Interrupted
    from tokopt.interrupts import interrupted, unwinding_on_signals

    with pytest.raises(Interrupted) as info, unwinding_on_signals():
        _swallowing_library()
    assert info.value.exit_code == 130 and isinstance(info.value.__cause__, ValueError)
    assert interrupted() is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupted_run_that_carried_on_publishes_nothing(tmp_path):
    from tokopt.backends.artifact import atomic_directory
    from tokopt.errors import Interrupted
    from tokopt.interrupts import unwinding_on_signals

    out = tmp_path / "out"
    with pytest.raises(Interrupted), unwinding_on_signals(), atomic_directory(out) as tmp:
        (tmp / "weights").write_text("half")
        try:
            _swallowing_library()
        except ValueError:
            pass  # the caller recovered from "the library's" error and went on to finish
    assert os.listdir(tmp_path) == []
