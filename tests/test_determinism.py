"""The same inputs give the same result: identical quality figures and byte-identical artifacts.

Each case runs ``tokopt optimize`` twice on a tiny llama, in two separate processes that differ in
everything that should not matter — the hash seed (set and dict iteration of strings), ``$TMPDIR``,
the working directory and OUT's name and location — and then compares:

- report.json with every figure that measures the machine or the moment left out (dates, seconds,
  tokens/s, RSS, the machine's bandwidth and what derives from it): everything else, perplexity,
  KL, top-1 agreement, sizes, parity, the resolved recipe, must be equal;
- every file of OUT but the reports, byte for byte (sha256): weights, graph, manifest, tokenizer,
  recipe.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: Report fields that measure the machine or the moment, not the model: left out of the comparison.
VOLATILE_KEYS = frozenset({"created", "seconds", "machine", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes",
                           "tokopt_peak_rss_bytes",
                           "kv_bytes_measured", "decode_tok_s_bound", "speed"})
#: The files of OUT that hold the report (it has timings); every other file must be byte-identical.
REPORT_FILES = frozenset({"report.json", "report.md", "report.html"})
_DURATION = re.compile(r"\bin \d+(\.\d+)? ?(s|ms|min)\b")  # "… 0.4 MB → 0.1 MB in 0 s" in a pass's notes

# int8 round-to-nearest on torch; int4 on onnxruntime (``auto`` picks GPTQ for 4 bits: calibrated, nibble-packed).
CASES = [("torch", "quantize:bits=8"), ("onnxruntime", "quantize:bits=4")]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("determinism_recipe") / "small.yaml"
    path.write_text("eval: {sequences: 2, seq_len: 16, calib_sequences: 2, calib_seq_len: 16}\n")
    return path


def _optimize(model: Path, recipe: Path, backend: str, passes: str, root: Path, hash_seed: str) -> Path:
    tmpdir, cwd = root / "tmp", root / "cwd"
    tmpdir.mkdir(parents=True)
    cwd.mkdir()
    out = root / f"out-{hash_seed}" / "artifact"
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run([sys.executable, "-m", "tokopt", "optimize", str(model), "--passes", passes, "--backend",
                           backend, "--recipe", str(recipe), "--speed", "off", "-o", str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def _stable(value: Any) -> Any:
    """``value`` without the fields in :data:`VOLATILE_KEYS` and durations in free text."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, str):
        return _DURATION.sub("in <duration>", value)
    return value


def _digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in REPORT_FILES}


@pytest.mark.parametrize("backend, passes", CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_same_inputs_give_identical_figures_and_artifact_bytes(small_llama, recipe, tmp_path, backend, passes):
    first = _optimize(small_llama, recipe, backend, passes, tmp_path / "a", hash_seed="1")
    second = _optimize(small_llama, recipe, backend, passes, tmp_path / "b", hash_seed="2")

    reports = [json.loads((out / "report.json").read_text()) for out in (first, second)]
    stage = reports[0]["stages"][-1]["metrics"]
    assert stage["ppl"] > 0 and stage["kl"] is not None  # the figures compared are really there
    assert reports[0]["stages"][-1]["pass"] == "quantize" and reports[0]["artifact"]["backend"] == backend
    assert _stable(reports[0]) == _stable(reports[1])

    digests = [_digests(out) for out in (first, second)]
    assert "tokopt_artifact.json" in digests[0] and len(digests[0]) >= 4
    differing = sorted(name for name in digests[0].keys() | digests[1].keys()
                       if digests[0].get(name) != digests[1].get(name))
    assert not differing, f"artifact files differ between two runs on the same inputs: {differing}"


def test_graph_weights_header_is_the_same_bytes_every_time(small_llama, tmp_path):
    """safetensors orders its metadata by a hash seeded per map; ``save_graph`` writes it sorted, so the bytes agree.

    In one process every save draws a new seed, so twelve saves of an unsorted header would
    all agree only once in 2**11.
    """
    import tokopt
    from tokopt.optimizer.ir.serialize import WEIGHTS_FILE, load_graph, save_graph

    graph = tokopt.load(str(small_llama))
    digests = set()
    for i in range(12):
        save_graph(graph, tmp_path / f"g{i}")
        digests.add(hashlib.sha256((tmp_path / f"g{i}" / WEIGHTS_FILE).read_bytes()).hexdigest())
    assert len(digests) == 1
    header = (tmp_path / "g0" / WEIGHTS_FILE).read_bytes()[8:200]
    assert header.startswith(b'{"__metadata__":{"format":"pt","tokopt":"graph-weights"}')
    again = load_graph(tmp_path / "g0")  # the rewritten header still reads
    assert sorted(again.params) == sorted(graph.params)
