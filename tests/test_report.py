"""report.json / report.md / the terminal table / report.html — and the HTML rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tokopt.measure.gates import GateResult, Gates, check_gates
from tokopt.report.document import (
    LONG_METRIC_KEYS,
    SCHEMA_VERSION,
    STAGE_METRIC_KEYS,
    format_table,
    new_report,
    stage_metrics,
    write_reports,
)
from tokopt.report.html import BAR_COLOURS, render_html

CHROMIUM = Path("/usr/bin/chromium")


def _stage(index: int, name: str, **values) -> dict:
    base = {"params": 134_515_008, "weight_bytes": 538_060_032, "bits_per_param": 32.0, "kv_bytes_per_token": 46080.0,
            "kv_bytes_at": {"2048": 46080.0 * 2048}, "flops_per_token": 270_000_000, "decode_tok_s_bound": 14.1,
            "ppl": 11.9, "ppl_delta_pct": 0.0, "kl": 0.0, "top1_agreement": 1.0, "prefill_tok_s": 300.0,
            "decode_tok_s": 9.0, "peak_rss_bytes": 900 * 2**20, "long_ppl": 10.07, "long_ppl_delta_pct": 0.0}
    base.update(values)
    return {"index": index, "name": name, "pass": name.split(":")[0] if index else None, "plugin": "tokopt",
            "changed": True if index else None, "notes": [f"did {name}"] if index else [],
            "metrics": stage_metrics(base, with_long=True), "speed": {"batch_size": 4}}


@pytest.fixture
def report() -> dict:
    stages = [
        _stage(0, "baseline"),
        _stage(1, "quantize:bits=8", weight_bytes=140_000_000, bits_per_param=8.3, ppl=11.91, ppl_delta_pct=0.08,
               kl=0.0012, top1_agreement=0.985, decode_tok_s=21.0, decode_tok_s_bound=54.0),
        _stage(2, "sparse-attention:window=256", weight_bytes=140_000_000, ppl=12.2, ppl_delta_pct=-2.5, kl=0.02,
               top1_agreement=0.95, decode_tok_s=22.0, long_ppl=10.6, long_ppl_delta_pct=5.3,
               kv_bytes_at={"2048": 46080.0 * 260}),
    ]
    rep = new_report(model={"source": "smollm2", "architecture": "LlamaForCausalLM", "layers": 30},
                     machine={"cpu": "test CPU", "cpu_count": 2, "memory_bandwidth_bytes_per_s": 7.4e9},
                     backend="torch", recipe={"version": 1, "passes": [{"name": "quantize", "options": {"bits": 8}}]},
                     eval={"name": "stdlib-docstrings:eval", "sequences": 8, "seq_len": 512, "long_context": 2048,
                           "long_sequences": 2}, stages=stages)
    gates = check_gates(Gates(max_ppl_increase=1.0, max_kl=0.01), stages[0]["metrics"], stages[-1]["metrics"])
    rep["gates"] = [g.as_dict() for g in gates]
    return rep


def test_stage_rows_have_exactly_the_documented_keys():
    values = {k: 1 for k in STAGE_METRIC_KEYS + LONG_METRIC_KEYS + ("bytes_per_token",)}
    assert tuple(stage_metrics(values, with_long=False)) == STAGE_METRIC_KEYS
    assert tuple(stage_metrics(values, with_long=True)) == STAGE_METRIC_KEYS + LONG_METRIC_KEYS
    assert stage_metrics({"ppl": float("nan")}, False)["ppl"] is None  # JSON has no NaN


def test_report_json_md_and_table(report, tmp_path):
    written = write_reports(report, tmp_path)
    assert written == ["report.json", "report.md", "report.html", "recipe.yaml"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema"] == "tokopt.report" and data["schema_version"] == SCHEMA_VERSION
    assert data["tool"]["name"] == "tokopt" and data["libraries"]["torch"]
    md = (tmp_path / "report.md").read_text()
    assert "| stage |" in md and "quantize:bits=8" in md and "**FAIL** `--max-kl`" in md
    table = format_table(report)
    lines = table.splitlines()
    assert lines[0].split()[0] == "stage" and "long ppl" in lines[0]
    assert "0.26x" in table  # weight bytes ratio against the baseline
    assert ("FAIL --max-kl: mean KL(baseline||final) is 0.02000; limit 0.01000, over by 0.01000 (2.00x the limit)"
            in table)
    assert "PASS --max-ppl-increase" in table
    assert (tmp_path / "recipe.yaml").read_text().startswith("version: 1")


def test_gate_messages_say_by_how_much():
    base = {"ppl": 10.0, "decode_tok_s": 10.0}
    final = {"ppl": 10.5, "ppl_delta_pct": 5.0, "kl": 0.001, "decode_tok_s": 12.0}
    results = check_gates(Gates(max_ppl_increase=2.0, max_kl=0.01, min_decode_speedup=1.5), base, final)
    by_gate = {r.gate: r for r in results}
    assert isinstance(by_gate["--max-ppl-increase"], GateResult)
    assert not by_gate["--max-ppl-increase"].passed and "over by 3.00 points" in by_gate["--max-ppl-increase"].message
    assert by_gate["--max-kl"].passed
    assert not by_gate["--min-decode-speedup"].passed and "short by 0.30x" in by_gate["--min-decode-speedup"].message


def test_html_is_self_contained(report):
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    for forbidden in ("<script", "<link", "src=", "href=", "url(", "@import"):
        assert forbidden not in page, forbidden
    # the only URL is the SVG namespace, which is a name, not a fetch
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}
    assert page.count('<svg class="chart"') == 8  # 6 always + measured decode + long-context ppl


def test_html_charts_a_stage_sensitivity_table(report):
    rows = [{"tensor": "model.layers.11.mlp.down_proj.weight", "params": 884_736, "chosen": "int8 g32",
             "bits_per_param": 8.5, "est_kl": {"int4 g32": 3e-2, "int8 g32": 3e-4}},
            {"tensor": "model.layers.3.self_attn.q_proj.weight", "params": 331_776, "chosen": "int4 g32",
             "bits_per_param": 4.5, "est_kl": {"int4 g32": 1e-4, "int8 g32": 1e-6}}]
    report["stages"][1]["tables"] = {"sensitivity": rows}
    page = render_html(report)
    assert page.count('<svg class="chart"') == 9 and 'data-metric="sensitivity"' in page
    assert "L11.down_proj→int8" in page and "L3.q_proj→int4" in page and "3.00e-02" in page


# -- the page in a real browser -------------------------------------------------------------------
def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into rows of pixel bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3)))
        prev = line
    return width, height, rows


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium "
                                                  "(apt-get update && apt-get install -y chromium)")
def test_html_report_renders_its_charts_in_headless_chromium(report, tmp_path):
    write_reports(report, tmp_path)
    url = (tmp_path / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    run = _chromium(["--window-size=1200,1400", f"--screenshot={shot}", url], tmp_path)
    assert shot.exists(), run.stderr[-2000:]
    width, height, rows = _png_pixels(shot)
    assert (width, height) == (1200, 1400)
    pixels = {row[i:i + 3] for row in rows[::4] for i in range(0, len(row), 12)}
    assert len(pixels) > 20, "the screenshot is (nearly) blank"
    # the bars are drawn: the first two series colours appear on screen
    for colour in BAR_COLOURS[:2]:
        rgb = bytes.fromhex(colour[1:])
        assert any(rgb in row for row in rows), f"no {colour} pixels: the charts did not render"
    dom = _chromium(["--dump-dom", url], tmp_path).stdout
    charts = re.findall(r'<svg class="chart" data-metric="([a-z_0-9]+)"', dom)
    assert charts == ["weight_bytes", "kv_bytes_per_token", "ppl_delta_pct", "kl", "top1_agreement",
                      "decode_tok_s_bound", "decode_tok_s", "long_ppl_delta_pct"]
    assert dom.count('<rect class="bar"') == len(charts) * len(report["stages"])
