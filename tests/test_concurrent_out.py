"""Two ``tokopt optimize`` runs writing the same ``-o`` at once: one wins whole, the other fails cleanly.

Both are real processes started together on a tiny llama.  Whichever finishes second finds OUT
taken — at the start (it exists) or at the commit (the other run renamed its result into place
while this one worked; ``atomic_directory`` holds a lock on OUT's parent for the rename) — and
exits 2 with one ``error:`` line.  OUT is the winner's complete artifact, and nothing else is left
beside it: no temporary sibling of either run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("round_", range(2))
def test_two_runs_on_one_out(small_llama, tmp_path, round_):
    out = tmp_path / "parent" / "OUT"
    cmd = [sys.executable, "-m", "tokopt", "optimize", str(small_llama), "--passes", "quantize:bits=8", "--backend",
           "torch", "--eval-tokens", "1x16", "--calib-tokens", "1x16", "--speed", "off", "-o", str(out)]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    runs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for run in runs:
        run.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (loser,) = [err for code, err in results if code == 2]
    lines = loser.strip().splitlines()
    assert "Traceback" not in loser and lines[-1].startswith("error: ") and str(out) in lines[-1], loser
    assert sorted(p.name for p in out.parent.iterdir()) == ["OUT"]  # no .OUT.tmp-* of either run
    manifest = json.loads((out / "tokopt_artifact.json").read_text())
    assert manifest["backend"] == "torch" and json.loads((out / "report.json").read_text())["passed"]
    assert all((out / f).is_file() for f in manifest["files"])
