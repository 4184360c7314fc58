"""The per-stage report: ``report.json`` (versioned), ``report.md``, and the terminal table.

One row per stage — the imported model (``baseline``) and then the graph after each
pass — with exactly the keys in :data:`STAGE_METRIC_KEYS` under ``metrics`` (plus
``long_ppl``/``long_ppl_delta_pct`` when a pass in the pipeline changes what attention
can see).  Everything a reader needs to trust or reproduce the numbers sits beside them:
tool and library versions, the machine and its measured bandwidth, the resolved recipe,
and the evaluation and calibration text.

Schema (``schema_version`` 2: the measured ``artifact_bytes``/``kv_bytes_measured`` and ``mismatches``)::

    {schema, schema_version, created, tool: {name, version}, libraries: {...}, machine: {...},
     model: {source, architecture, ...}, backend, recipe: {version, passes: [{name, options, plugin, spec}], ...},
     eval: {corpus..., sequences, seq_len, [long_context]}, calibration: {...}, speed_config: {...},
     quality_measured_on, stages: [{index, name, pass, plugin, changed, notes, seconds: {...},
               metrics: {STAGE_METRIC_KEYS}, quality_measured_on,
               speed: {batch_size, prefill_tok_s_batch, decode_tok_s_batch, measured_on},
               mismatches: [{metric, context, measured, analytic, ratio, message}]}],
     gates: [{gate, limit, value, passed, message}], passed, warnings: [...],
     artifact: {backend, plugin, files, parity: {...}, [linear_kernels: {kernel: quantized Linears it runs;
                "dequantized": held in float32 since load}]} | null}

Units: bytes, tokens/s, FLOPs; ``ppl_delta_pct`` in percent of the baseline; ``kl`` in nats.
Analytic figures come from the graph (``weight_bytes``, ``kv_bytes_at``); measured ones from the
artifact that ships: ``artifact_bytes`` (its weight files on disk), ``kv_bytes_measured`` (context ->
the session's allocated KV cache after prefilling that many tokens), the speeds and ``peak_rss_bytes``;
the quality metrics too where the backend's session runs here (``quality_measured_on`` says which).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

SCHEMA = "tokopt.report"
SCHEMA_VERSION = 2

STAGE_METRIC_KEYS: tuple[str, ...] = (
    "params", "weight_bytes", "artifact_bytes", "bits_per_param", "kv_bytes_per_token", "kv_bytes_at",
    "kv_bytes_measured", "flops_per_token", "decode_tok_s_bound", "ppl", "ppl_delta_pct", "kl", "top1_agreement",
    "prefill_tok_s", "decode_tok_s", "peak_rss_bytes",
)
LONG_METRIC_KEYS: tuple[str, ...] = ("long_ppl", "long_ppl_delta_pct")

LIBRARIES = ("torch", "transformers", "numpy", "networkx", "safetensors", "onnx", "onnxruntime", "gguf", "pluggy",
             "click")


def library_versions() -> dict[str, str | None]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def tool_info() -> dict[str, str]:
    from tokopt.version import __version__

    return {"name": "tokopt", "version": __version__}


def new_report(**sections: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": tool_info(), "libraries": library_versions(),
    }
    report.update(sections)
    report.setdefault("stages", [])
    report.setdefault("gates", [])
    report.setdefault("warnings", [])
    return report


def stage_metrics(values: dict[str, Any], with_long: bool) -> dict[str, Any]:
    """Exactly the report's stage keys, in order (missing measurements are ``None``)."""
    keys = STAGE_METRIC_KEYS + (LONG_METRIC_KEYS if with_long else ())
    return {k: _plain(values.get(k)) for k in keys}


def _plain(value: Any) -> Any:
    """JSON-safe numbers: no NaN/inf (JSON has none), ints stay ints."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- human formats ------------------------------------------------------------------------------
def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _ratio(v: Any, base: Any) -> str:
    if v is None or not base:
        return ""
    return f" ({v / base:.2f}x)"


COLUMNS: tuple[tuple[str, str], ...] = (
    ("stage", "stage"), ("weights", "weight_bytes"), ("artifact", "artifact_bytes"), ("bits/p", "bits_per_param"),
    ("KV B/tok", "kv_bytes_per_token"), ("KV measured", "kv_bytes_measured"),
    ("GFLOP/tok", "flops_per_token"), ("bound tok/s", "decode_tok_s_bound"), ("ppl", "ppl"), ("Δppl", "ppl_delta_pct"),
    ("KL", "kl"), ("top1", "top1_agreement"), ("prefill tok/s", "prefill_tok_s"), ("decode tok/s", "decode_tok_s"),
    ("peak RSS", "peak_rss_bytes"),
)


def _kv_measured(m: dict[str, Any]) -> str:
    """The session's KV memory at the longest context measured, as ``bytes @context``."""
    measured = m.get("kv_bytes_measured") or {}
    if not measured:
        return "-"
    context = max(measured, key=int)
    return f"{human_bytes(measured[context])} @{context}"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    stages = report["stages"]
    with_long = any("long_ppl" in s["metrics"] for s in stages)
    header = [c for c, _ in COLUMNS] + (["long ppl", "Δlong"] if with_long else [])
    base = stages[0]["metrics"] if stages else {}
    rows = []
    for s in stages:
        m = s["metrics"]
        flagged = {f["metric"] for f in s.get("mismatches", [])}
        row = [
            s["name"] + ("" if s.get("changed") is not False else " (no change)") + (" [!]" if flagged else ""),
            human_bytes(m["weight_bytes"]) + _ratio(m["weight_bytes"], base.get("weight_bytes")),
            human_bytes(m.get("artifact_bytes")) + (" !" if "artifact_bytes" in flagged else ""),
            _num(m["bits_per_param"], ".2f"),
            _num(m["kv_bytes_per_token"], ",.0f") + _ratio(m["kv_bytes_per_token"], base.get("kv_bytes_per_token")),
            _kv_measured(m) + (" !" if "kv_bytes" in flagged else ""),
            _num(None if m["flops_per_token"] is None else m["flops_per_token"] / 1e9, ".3f"),
            _num(m["decode_tok_s_bound"], ".1f"),
            _num(m["ppl"], ".3f"),
            _num(m["ppl_delta_pct"], "+.2f") + ("%" if m["ppl_delta_pct"] is not None else ""),
            _num(m["kl"], ".4f"),
            _num(m["top1_agreement"], ".3f"),
            _num(m["prefill_tok_s"], ".1f"),
            _num(m["decode_tok_s"], ".1f"),
            human_bytes(m["peak_rss_bytes"]),
        ]
        if with_long:
            delta = m.get("long_ppl_delta_pct")
            row += [_num(m.get("long_ppl"), ".3f"), _num(delta, "+.2f") + ("%" if delta is not None else "")]
        rows.append(row)
    return header, rows


def format_table(report: dict[str, Any]) -> str:
    """The terminal table: one line per stage, ratios against the baseline in parentheses."""
    header, rows = table_rows(report)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    lines = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    if any(s.get("mismatches") for s in report["stages"]):
        lines.append("[!] / !: a measured figure of the artifact differs from the IR's by more than 10 % "
                     "(see the warnings; --strict fails on it)")
    for g in report.get("gates", []):
        lines.append(f"{'PASS' if g['passed'] else 'FAIL'} {g['gate']}: {g['message']}")
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def to_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    model = report.get("model", {})
    machine = report.get("machine", {})
    ev = report.get("eval", {})
    out = [f"# tokopt report: {model.get('source', '?')}", ""]
    out.append(f"- tokopt {report['tool']['version']}, report schema {report['schema_version']}, {report['created']}")
    out.append(f"- model: {model.get('architecture', '?')} ({model.get('model_type', '?')}), "
               f"{model.get('layers', '?')} layers")
    out.append(f"- backend: {report.get('backend') or 'none'}; speed measured on "
               f"{report.get('speed_measured_on', '-')}; final quality measured on "
               f"{report.get('quality_measured_on') or '-'}")
    bandwidth = (machine.get("memory_bandwidth_bytes_per_s") or 0) / 1e9
    out.append(f"- machine: {machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} cores, memory bandwidth "
               f"{bandwidth:.1f} GB/s ({machine.get('memory_bandwidth_source', '')})")
    out.append(f"- eval text: {ev.get('name', '?')}, {ev.get('sequences', '?')} x {ev.get('seq_len', '?')} tokens"
               + (f"; long context {ev['long_sequences']} x {ev['long_context']}" if ev.get("long_context") else ""))
    out += ["", "## Stages", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    notes = [(s["name"], n) for s in report["stages"] for n in s.get("notes", [])]
    if notes:
        out += ["", "## What each pass did", ""] + [f"- `{name}`: {n}" for name, n in notes]
    if report.get("gates"):
        out += ["", "## Gates", ""] + [f"- **{'PASS' if g['passed'] else 'FAIL'}** `{g['gate']}`: {g['message']}"
                                       for g in report["gates"]]
    if report.get("warnings"):
        out += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    out += ["", "## Recipe", "", "```yaml", recipe_yaml(report.get("recipe", {})).rstrip(), "```", ""]
    return "\n".join(out)


def recipe_yaml(recipe: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def write_reports(report: dict[str, Any], out_dir: Path) -> list[str]:
    """Write report.json, report.md, report.html and recipe.yaml into ``out_dir``; returns the names."""
    from tokopt.report.html import render_html

    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(_plain(report), indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(to_markdown(report))
    (out_dir / "report.html").write_text(render_html(report), encoding="utf-8")
    (out_dir / "recipe.yaml").write_text(recipe_yaml(report.get("recipe", {})))
    return ["report.json", "report.md", "report.html", "recipe.yaml"]


__all__ = [
    "SCHEMA", "SCHEMA_VERSION", "STAGE_METRIC_KEYS", "LONG_METRIC_KEYS", "new_report", "stage_metrics",
    "format_table", "to_markdown", "write_reports", "library_versions", "human_bytes", "recipe_yaml",
]
