"""``report.html``: one self-contained page with inline SVG charts of the per-stage deltas.

No scripts, fonts, stylesheets or images are fetched: the charts are SVG drawn here, so
the page renders the same offline, in a CI artifact viewer, or attached to an e-mail.
Each chart is an ``<svg class="chart" data-metric="…">`` whose bars are
``<rect class="bar">`` — the structure the headless-browser test looks for.
"""

from __future__ import annotations

import html
from typing import Any

from tokopt.report.document import human_bytes, table_rows

BAR_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:2em;color:#222;
background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em}
.meta{color:#555;font-size:.9em;line-height:1.5}
table{border-collapse:collapse;font-size:.85em;margin-top:.5em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
.charts{display:flex;flex-wrap:wrap;gap:18px}.scroll{overflow-x:auto}
.chart{border:1px solid #e5e5e5;border-radius:6px;background:#fcfcfc}
.chart text{font-size:12px;fill:#333}.chart .title{font-size:13px;font-weight:600}
.chart .axis{stroke:#888;stroke-width:1}
.pass{color:#1a7f37;font-weight:600}.fail{color:#c62828;font-weight:600}
pre{background:#f6f8fa;padding:10px;border-radius:6px;font-size:.85em;overflow-x:auto}
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def bar_chart(title: str, metric: str, labels: list[str], values: list[float | None], fmt: str,
              unit: str = "", width: int = 480) -> str:
    """A horizontal bar chart; negative values grow left of a zero axis.  Missing values are skipped."""
    bar_h, gap, top, label_w, right_pad = 22, 8, 34, 150, 110
    height = top + len(labels) * (bar_h + gap) + 10
    present = [v for v in values if v is not None]
    lo, hi = min([0.0, *present]), max([0.0, *present])
    span = (hi - lo) or 1.0
    plot_w = width - label_w - right_pad
    zero_x = label_w + (0 - lo) / span * plot_w
    parts = [f'<svg class="chart" data-metric="{_esc(metric)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{_esc(title)}">',
             f'<text class="title" x="10" y="20">{_esc(title)}</text>']
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * (bar_h + gap)
        short = label if len(label) <= 22 else label[:21] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">{_esc(short)}'
                     f'<title>{_esc(label)}</title></text>')
        if value is None:
            parts.append(f'<text x="{zero_x + 4:.1f}" y="{y + bar_h * 0.7:.1f}">n/a</text>')
            continue
        x0 = zero_x if value >= 0 else zero_x - (-value) / span * plot_w
        w = max(abs(value) / span * plot_w, 1.0)
        colour = BAR_COLOURS[i % len(BAR_COLOURS)]
        parts.append(f'<rect class="bar" x="{x0:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                     f'<title>{_esc(label)}: {format(value, fmt)}{_esc(unit)}</title></rect>')
        tx = x0 + w + 4 if value >= 0 else zero_x + 4  # negative bars: the value sits right of the axis
        parts.append(f'<text x="{tx:.1f}" y="{y + bar_h * 0.7:.1f}">{format(value, fmt)}{_esc(unit)}</text>')
    parts.append(f'<line class="axis" x1="{zero_x:.1f}" y1="{top - 4}" x2="{zero_x:.1f}" y2="{height - 6}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _rel(stages: list[dict[str, Any]], key: str) -> list[float | None]:
    base = stages[0]["metrics"].get(key)
    return [None if (s["metrics"].get(key) is None or not base) else s["metrics"][key] / base for s in stages]


def sensitivity_chart(stage: str, table: list[dict[str, Any]], top: int = 24) -> str:
    """The tensors whose quantization costs most (estimated KL in their cheapest format), and what each got."""
    rows = table[:top]
    def short(tensor: str) -> str:
        t = tensor.removeprefix("model.").removesuffix(".weight").replace("layers.", "L")
        return t.replace("self_attn.", "").replace("mlp.", "")

    labels = [f"{short(r['tensor'])}→{r['chosen'].split()[0]}" for r in rows]
    return bar_chart(f"{stage}: most sensitive tensors (estimated KL alone, cheapest format)", "sensitivity",
                     labels, [max(r["est_kl"].values()) for r in rows], ".2e", " nats")


def charts(report: dict[str, Any]) -> list[str]:
    stages = report["stages"]
    if not stages:
        return []
    labels = [s["name"] for s in stages]
    m = [s["metrics"] for s in stages]
    out = [
        bar_chart("Weight bytes vs baseline", "weight_bytes", labels, _rel(stages, "weight_bytes"), ".3f", "x"),
        bar_chart("KV-cache bytes per token vs baseline", "kv_bytes_per_token", labels,
                  _rel(stages, "kv_bytes_per_token"), ".3f", "x"),
        bar_chart("Perplexity change", "ppl_delta_pct", labels, [x.get("ppl_delta_pct") for x in m], "+.2f", "%"),
        bar_chart("Mean KL(baseline || stage), nats", "kl", labels, [x.get("kl") for x in m], ".4f"),
        bar_chart("Top-1 agreement with baseline", "top1_agreement", labels, [x.get("top1_agreement") for x in m],
                  ".3f"),
        bar_chart("Decode speed-of-light (bandwidth / bytes per token)", "decode_tok_s_bound", labels,
                  [x.get("decode_tok_s_bound") for x in m], ".1f", " tok/s"),
    ]
    if any(x.get("decode_tok_s") is not None for x in m):
        out.append(bar_chart("Measured decode speed vs baseline", "decode_tok_s", labels, _rel(stages, "decode_tok_s"),
                             ".2f", "x"))
    out += [sensitivity_chart(s["name"], s["tables"]["sensitivity"]) for s in stages
            if s.get("tables", {}).get("sensitivity")]
    if any("long_ppl_delta_pct" in x for x in m):
        ctx = report.get("eval", {}).get("long_context", "")
        out.append(bar_chart(f"Long-context perplexity change @ {ctx}", "long_ppl_delta_pct", labels,
                             [x.get("long_ppl_delta_pct") for x in m], "+.2f", "%"))
    return out


def render_html(report: dict[str, Any]) -> str:
    from tokopt.report.document import recipe_yaml

    header, rows = table_rows(report)
    model = report.get("model", {})
    machine = report.get("machine", {})
    ev = report.get("eval", {})
    meta = [
        f"tokopt {_esc(report['tool']['version'])} · report schema {report['schema_version']} · "
        f"{_esc(report['created'])}",
        f"model: {_esc(model.get('source', '?'))} — {_esc(model.get('architecture', '?'))}, "
        f"{_esc(model.get('layers', '?'))} layers",
        f"backend: {_esc(report.get('backend') or 'none')} · speed measured on "
        f"{_esc(report.get('speed_measured_on', '-'))} · final quality measured on "
        f"{_esc(report.get('quality_measured_on') or '-')}",
        f"machine: {_esc(machine.get('cpu', '?'))}, {_esc(machine.get('cpu_count', '?'))} cores, "
        f"{human_bytes(machine.get('memory_bytes'))} RAM, bandwidth "
        f"{(machine.get('memory_bandwidth_bytes_per_s') or 0) / 1e9:.1f} GB/s",
        f"eval text: {_esc(ev.get('name', '?'))}, {_esc(ev.get('sequences', '?'))} × "
        f"{_esc(ev.get('seq_len', '?'))} tokens",
    ]
    heads = "".join(f"<th>{_esc(h)}</th>" for h in header)
    table = [f'<div class="scroll"><table><thead><tr>{heads}</tr></thead><tbody>']
    table += ["<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    table.append("</tbody></table></div>")
    gates = "".join(f'<li><span class="{"pass" if g["passed"] else "fail"}">{"PASS" if g["passed"] else "FAIL"}'
                    f'</span> <code>{_esc(g["gate"])}</code>: {_esc(g["message"])}</li>'
                    for g in report.get("gates", []))
    warnings = "".join(f"<li>{_esc(w)}</li>" for w in report.get("warnings", []))
    notes = "".join(f"<li><code>{_esc(s['name'])}</code>: {_esc(n)}</li>"
                    for s in report["stages"] for n in s.get("notes", []))
    body = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tokopt report: {_esc(model.get('source', ''))}</title>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<style>{CSS}</style></head><body>",
        f"<h1>tokopt report: {_esc(model.get('source', ''))}</h1>",
        '<div class="meta">' + "<br>".join(meta) + "</div>",
        "<h2>Per-stage deltas</h2>", '<div class="charts">' + "".join(charts(report)) + "</div>",
        "<h2>Stages</h2>", "".join(table),
    ]
    if notes:
        body += ["<h2>What each pass did</h2>", f"<ul>{notes}</ul>"]
    if gates:
        body += ["<h2>Gates</h2>", f"<ul>{gates}</ul>"]
    if warnings:
        body += ["<h2>Warnings</h2>", f"<ul>{warnings}</ul>"]
    body += ["<h2>Recipe</h2>", f"<pre>{_esc(recipe_yaml(report.get('recipe', {})))}</pre>", "</body></html>"]
    return "\n".join(body) + "\n"


__all__ = ["render_html", "bar_chart", "charts"]
