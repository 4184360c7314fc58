"""``sweep.html``: the trials of a sweep as scatter plots of quality against each cost, Pareto fronts drawn.

Self-contained like ``report.html`` (inline SVG, no scripts).  Each plot is an
``<svg class="chart scatter" data-metric="…">`` whose trials are ``<circle class="trial">`` and whose
front is ``<circle class="trial pareto">`` joined by a ``<polyline class="front">`` — the structure the
headless-browser test looks for.
"""

from __future__ import annotations

from typing import Any

from tokopt.report.document import human_bytes
from tokopt.report.html import CSS, _esc

#: The Pareto fronts: quality against each cost (lower is better, except tok/s).
FRONTS = (("weight_bytes", "weight bytes", False), ("kv_bytes_at_2048", "KV bytes at 2,048 tokens", False),
          ("decode_tok_s", "decode tok/s (measured, one artifact at a time)", True))
SCATTER_CSS = """
.scatter .trial{fill:#4c78a8;fill-opacity:.55}.scatter .pareto{fill:#e45756;fill-opacity:1}
.scatter .front{fill:none;stroke:#e45756;stroke-width:1.5}.scatter .grid{stroke:#eee}
.best td{background:#fff4d6}
"""


def _cost(trial: dict[str, Any], key: str) -> float | None:
    return (trial.get("speed") or {}).get(key) if key == "decode_tok_s" else trial["metrics"].get(key)


def scatter(title: str, key: str, trials: list[dict[str, Any]], front: list[str], higher: bool,
            width: int = 460, height: int = 320) -> str:
    """Δppl % (y) against one cost (x); the trials on the Pareto front in red, joined in cost order."""
    pts = [(t, _cost(t, key), t["metrics"].get("ppl_delta_pct")) for t in trials]
    pts = [(t, x, y) for t, x, y in pts if x is not None and y is not None]
    left, right, top, bottom = 64, 16, 30, 44
    parts = [f'<svg class="chart scatter" data-metric="{_esc(key)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{_esc(title)}">', f'<text class="title" x="10" y="18">{_esc(title)}</text>']
    if not pts:
        parts += [f'<text x="{left}" y="{height / 2}">not measured</text>', "</svg>"]
        return "".join(parts)
    xs, ys = [x for _, x, _ in pts], [y for _, _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    xspan, yspan = (x1 - x0) or abs(x1) or 1.0, (y1 - y0) or 1.0
    x0, x1, y1 = x0 - 0.05 * xspan, x1 + 0.05 * xspan, y1 + 0.08 * yspan

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    fmt = human_bytes if "bytes" in key else (lambda v: f"{v:.1f}")
    for frac in (0.0, 0.5, 1.0):
        gy, gx = y0 + frac * (y1 - y0), x0 + frac * (x1 - x0)
        parts.append(f'<line class="grid" x1="{left}" y1="{py(gy):.1f}" x2="{width - right}" y2="{py(gy):.1f}"/>')
        parts.append(f'<text x="{left - 4}" y="{py(gy) + 4:.1f}" text-anchor="end">{gy:+.1f}%</text>')
        parts.append(f'<text x="{px(gx):.1f}" y="{height - bottom + 16}" text-anchor="middle">{_esc(fmt(gx))}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 f'{_esc(title)}{" (higher is better)" if higher else ""}</text>')
    parts.append(f'<text x="12" y="{top + 8}" transform="rotate(-90 12 {top + 8})" text-anchor="end">Δppl</text>')
    on_front = sorted(((x, y) for t, x, y in pts if t["key"] in front))
    if len(on_front) > 1:
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in on_front)
        parts.append(f'<polyline class="front" points="{line}"/>')
    for t, x, y in pts:
        cls = "trial pareto" if t["key"] in front else "trial"
        parts.append(f'<circle class="{cls}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="5"><title>{_esc(t["passes"])}: '
                     f'Δppl {y:+.2f}%, {_esc(fmt(x))}</title></circle>')
    parts.append(f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}"/>')
    parts.append("</svg>")
    return "".join(parts)


def render_sweep_html(result: dict[str, Any]) -> str:
    trials = result["trials"]
    ok = [t for t in trials if t["status"] in ("ok", "cached")]
    best = (result.get("best") or {}).get("key")
    charts = [scatter(label, key, ok, result["pareto"].get(key, []), higher) for key, label, higher in FRONTS]
    head = ["pipeline", "status", "Δppl %", "KL", "weight bytes", "artifact bytes", "bits/param", "KV @2048",
            "decode tok/s", "Pareto on", "seconds"]
    rows = []
    for t in trials:
        m, speed = t["metrics"], t.get("speed") or {}
        fronts = ", ".join(k for k in result["pareto"] if t["key"] in result["pareto"][k])
        cells = [t["passes"], t["status"] if not t.get("error") else f"{t['status']}: {t['error']}",
                 _num(m.get("ppl_delta_pct"), "+.2f"), _num(m.get("kl"), ".4f"), human_bytes(m.get("weight_bytes")),
                 human_bytes(m.get("artifact_bytes")), _num(m.get("bits_per_param"), ".2f"),
                 human_bytes(m.get("kv_bytes_at_2048")), _num(speed.get("decode_tok_s"), ".1f"), fronts,
                 _num(t.get("seconds"), ".1f")]
        cls = ' class="best"' if t["key"] == best else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    base = result["baseline"]
    bar = result.get("max_ppl_increase")
    chosen = (f"cheapest (fewest weight bytes) within {'+' + format(bar, 'g') + ' %' if bar is not None else 'any'} "
              f"Δppl: <code>{_esc(result['best']['passes'])}</code> → recipe.yaml" if result.get("best")
              else "no trial within the bar: no recipe.yaml")
    meta = [f"tokopt {_esc(result['tool']['version'])} · model {_esc(result['model'])}",
            f"grid <code>{_esc(result['grid'])}</code>: {len(trials)} pipelines "
            f"({result['counts']['ok']} run, {result['counts']['cached']} from the cache, "
            f"{result['counts']['failed']} failed)",
            f"workers: {result['workers']}{' on ' + _esc(result['ray_address']) if result.get('ray_address') else ''}"
            f" · trials {result['seconds']['trials']:.0f} s, total {result['seconds']['total']:.0f} s",
            f"baseline: ppl {_num(base.get('ppl'), '.3f')}, weights {human_bytes(base.get('weight_bytes'))}, "
            f"decode {_num(base.get('decode_tok_s'), '.1f')} tok/s", chosen]
    body = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>tokopt sweep: {_esc(result['model'])}</title>",
            f"<style>{CSS}{SCATTER_CSS}</style></head><body>",
            f"<h1>tokopt sweep: {_esc(result['model'])}</h1>", '<div class="meta">' + "<br>".join(meta) + "</div>",
            "<h2>Quality against cost (Pareto fronts in red)</h2>", '<div class="charts">' + "".join(charts) + "</div>",
            "<h2>Trials</h2>", '<div class="scroll"><table><thead><tr>'
            + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></div>", "</body></html>"]
    return "\n".join(body) + "\n"


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


__all__ = ["render_sweep_html", "scatter"]
