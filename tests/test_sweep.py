"""tokopt sweep: the grid, one shared baseline, failing trials recorded, resume from the cache, Ray, the page."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tokopt.cli import cli
from tokopt.errors import RecipeError
from tokopt.jobs.sweep import expand_grid, pareto

KNOWN = ("quantize", "sparse-attention", "gqa", "kv-layout")
CHROMIUM = Path("/usr/bin/chromium")
#: 2 x 2 pipelines that work, and 2 more whose gqa cannot apply (the tiny llama has 2 KV heads): failing trials.
GRID = "quantize:bits=4|8,group_size=32,method=rtn,gqa?:num_kv_heads=3"


def test_grid_expands_alternatives_and_optional_passes():
    pipelines = expand_grid("quantize:bits=4|8,group_size=32|64,sparse-attention?:window=128|256", KNOWN)
    assert len(pipelines) == 12 and len(set(pipelines)) == 12
    assert "quantize:bits=4,group_size=32" in pipelines
    assert "quantize:bits=8,group_size=64,sparse-attention:window=256" in pipelines
    assert expand_grid("sparse-attention?:window=8", KNOWN) == ["sparse-attention:window=8"]  # not the empty one
    assert expand_grid("quantize:layers=0;1|2", KNOWN) == ["quantize:layers=0;1", "quantize:layers=2"]
    with pytest.raises(RecipeError, match="empty alternative"):
        expand_grid("quantize:bits=4|", KNOWN)
    with pytest.raises(RecipeError):
        expand_grid("no-such-pass", KNOWN)


def test_pareto_front():
    # (quality, cost): (1, 10) and (2, 5) are both best somewhere; (3, 10) is beaten by both
    assert pareto([(1.0, 10.0), (2.0, 5.0), (3.0, 10.0)]) == [0, 1]
    assert pareto([(1.0, 10.0), (2.0, 50.0)], higher_is_better=True) == [0, 1]
    assert pareto([(1.0, 50.0), (2.0, 10.0)], higher_is_better=True) == [0]


def _sweep(model: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["sweep", str(model), "--grid", GRID, "-o", str(out), "--eval-tokens", "2x16",
                                    "--calib-tokens", "2x16", "--max-ppl-increase", "50", "--json", *extra])


def _check(result, out: Path) -> dict:
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.stdout)
    assert sweep == json.loads((out / "sweep.json").read_text())
    by = {t["passes"]: t for t in sweep["trials"]}
    assert len(by) == 4
    failed = [t for t in sweep["trials"] if t["status"] == "failed"]
    assert {t["passes"] for t in failed} == {f"quantize:bits={b},group_size=32,method=rtn,gqa:num_kv_heads=3"
                                             for b in (4, 8)}
    assert all("num_kv_heads=3" in t["error"] for t in failed)  # the trial says why
    return sweep


def test_sweep_survives_a_failing_trial_and_resumes_from_the_cache(small_llama, tmp_path):
    out = tmp_path / "sweep"
    first = _check(_sweep(small_llama, out, "--speed", "off"), out)
    ok = {t["passes"]: t for t in first["trials"] if t["status"] == "ok"}
    assert len(ok) == 2
    # one baseline for all: every trial's report carries the same stage 0, marked as shared
    reports = [json.loads((out / "trials" / t["key"] / "report.json").read_text()) for t in ok.values()]
    assert {r["stages"][0]["metrics"]["ppl"] for r in reports} == {first["baseline"]["ppl"]}
    assert first["best"]["passes"] == "quantize:bits=4,group_size=32,method=rtn"  # fewest bytes within +50 %
    recipe = (out / "recipe.yaml").read_text()
    assert "bits: 4" in recipe
    dry = CliRunner().invoke(cli, ["optimize", str(small_llama), "--recipe", str(out / "recipe.yaml"), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert not (out / "trials" / first["best"]["key"] / "model.onnx").exists()  # reports kept, models dropped
    again = _check(_sweep(small_llama, out, "--speed", "off"), out)
    assert {t["passes"]: t["status"] for t in again["trials"] if t["status"] != "failed"} == \
        {p: "cached" for p in ok}
    assert {t["passes"]: t["metrics"] for t in again["trials"] if t["status"] == "cached"} == \
        {p: t["metrics"] for p, t in ok.items()}


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray: pip install 'tokopt[distributed]'")
def test_sweep_on_local_ray_with_speed_and_page(small_llama, tmp_path):
    out = tmp_path / "sweep"
    sweep = _check(_sweep(small_llama, out, "--workers", "2"), out)
    assert sweep["workers"] == 2
    ok = [t for t in sweep["trials"] if t["status"] == "ok"]
    assert all(t["speed"]["decode_tok_s"] > 0 for t in ok)  # measured afterwards, one artifact at a time
    assert sweep["baseline"]["decode_tok_s"] > 0
    page = (out / "sweep.html").read_text()
    assert page.count('<svg class="chart scatter"') == 3 and page.count('class="trial pareto"') >= 3
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_sweep_without_ray_says_how_to_get_it(small_llama, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = CliRunner().invoke(cli, ["sweep", str(small_llama), "--grid", "quantize:bits=8", "-o",
                                      str(tmp_path / "s"), "--workers", "2"])
    assert result.exit_code == 2 and "pip install 'tokopt[distributed]'" in result.output
    assert "--workers 1" in result.output


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_sweep_page_renders_in_headless_chromium(tmp_path):
    from tokopt.report.sweep_page import render_sweep_html

    def trial(key: str, dppl: float, wbytes: int, kv: int, tok_s: float) -> dict:
        return {"passes": f"quantize:{key}", "key": key, "status": "ok", "error": None, "seconds": 1.0,
                "metrics": {"ppl_delta_pct": dppl, "weight_bytes": wbytes, "kv_bytes_at_2048": kv, "kl": 0.01},
                "speed": {"decode_tok_s": tok_s}}

    trials = [trial("a", 1.0, 100, 50, 30.0), trial("b", 5.0, 40, 50, 60.0), trial("c", 8.0, 90, 80, 20.0)]
    result = {"tool": {"version": "x"}, "model": "m", "grid": "g", "workers": 2, "ray_address": None,
              "trials": trials, "baseline": {"ppl": 10.0, "weight_bytes": 400, "decode_tok_s": 10.0},
              "pareto": {"weight_bytes": ["a", "b"], "kv_bytes_at_2048": ["a"], "decode_tok_s": ["a", "b"]},
              "max_ppl_increase": 6.0, "best": {"key": "b", "passes": "quantize:b", "metrics": {}},
              "seconds": {"trials": 1.0, "total": 2.0}, "counts": {"ok": 3, "cached": 0, "failed": 0}}
    page = tmp_path / "sweep.html"
    page.write_text(render_sweep_html(result))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), *flags, "--window-size=1400,900", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=False).stdout
    assert re.findall(r'<svg class="chart scatter" data-metric="([a-z_0-9]+)"', dom) == \
        ["weight_bytes", "kv_bytes_at_2048", "decode_tok_s"]
    assert dom.count('class="trial pareto"') == 5 and dom.count('class="front"') == 2
