"""KV-cache quantization for the ``quantize`` pass: an integer ``kv_cache.dtype`` on every Attention.

Two layouts (the schema and its byte count live in :mod:`tokopt.optimizer.ir.attrs`, the numbers
the reference reads in :mod:`tokopt.optimizer.interpret.kv_quant`):

- ``key_axis=token``: K and V get scales per token (per head, optionally per group of dims) —
  the int8 default;
- ``key_axis=channel`` (KIVI, Liu et al. 2024): K per channel over blocks of ``token_group``
  positions, V per token, the newest ``residual .. residual + token_group - 1`` tokens read in full
  precision — the int4 default on layers without a sliding window (a window's ring would evict
  tokens out of a key block, so windowed layers keep ``key_axis=token`` unless told otherwise,
  and an explicit ``kv_key_axis=channel`` on them is refused).
"""

from __future__ import annotations

from typing import Any

from tokopt.errors import PassOptionError
from tokopt.optimizer.ir.attrs import kv_cache_quant_attrs
from tokopt.optimizer.ir.graph import Graph, Node
from tokopt.optimizer.ir.ops import kv_bytes_per_token

#: KIVI defaults for 4 bits, chosen on SmolLM2-135M (benchmarks/bench_kv_int4.py): every G in {32, 64, 128},
#: R in {0, 32}, value group in {64, 32} met Δppl <= +2 % at <= 0.16x bytes per token; G = 32, R = 0, values
#: per 64 dims holds the fewest bytes at 512 and 2,048 tokens (the full-precision ring of R + G float32 slots
#: outweighs G = 128's 0.011x saving per token until ~10k tokens).
KIVI_TOKEN_GROUP = 32
KIVI_RESIDUAL = 0
KIVI_VALUE_GROUP = 64


def key_axis_for(node: Node, opts: dict[str, Any]) -> str:
    """The key axis a layer gets: the option, or (unset) channel for 4 bits on a layer without a window."""
    if opts.get("kv_key_axis"):
        return opts["kv_key_axis"]
    return "channel" if opts["kv_bits"] == 4 and not node.attrs.get("window") else "token"


def check_kv_options(g: Graph, opts: dict[str, Any]) -> None:
    """Refuse, by name, KV options this graph cannot take (before any work)."""
    attention = g.nodes("Attention")
    gs = opts.get("kv_group_size")
    bad = sorted({n.attrs["head_dim"] for n in attention if gs and n.attrs["head_dim"] % gs})
    if bad:
        raise PassOptionError(f"quantize: kv_group_size={gs} does not divide head_dim {bad[0]}; use a divisor "
                              f"of {bad[0]} (e.g. {bad[0] // 2}) or leave it unset for per-head scales")
    if opts.get("kv_key_axis") == "channel":
        windowed = [n.name for n in attention if n.attrs.get("window")]
        if windowed:
            raise PassOptionError(
                f"quantize: kv_key_axis=channel (KIVI) on {windowed[0]} (window="
                f"{g.node(windowed[0]).attrs['window']})"
                f"{f' (and {len(windowed) - 1} more)' if len(windowed) > 1 else ''}: a sliding-window ring evicts "
                "tokens out of the per-channel key blocks; leave kv_key_axis unset (windowed layers then keep "
                "per-token keys) or use kv_key_axis=token")
    kivi = any(key_axis_for(n, opts) == "channel" for n in attention)
    given = [k for k in ("kv_token_group", "kv_residual") if opts.get(k) is not None]
    if given and not kivi:
        raise PassOptionError(f"quantize: {'/'.join(given)} set, but no layer gets per-channel keys "
                              f"(kv_key_axis={opts.get('kv_key_axis') or 'token'} at kv_bits={opts['kv_bits']}); "
                              "set kv_key_axis=channel")


def quantize_kv_cache(g: Graph, opts: dict[str, Any]) -> str:
    """Set an int``kv_bits`` cache on every Attention of ``g`` from the pass options; returns the report's note."""
    check_kv_options(g, opts)
    bits = opts["kv_bits"]
    sym = opts["kv_symmetric"] if opts.get("kv_symmetric") is not None else bits == 8
    before = after = 0.0
    axes: dict[str, int] = {}
    for node in g.nodes("Attention"):
        a = node.attrs
        axis = key_axis_for(node, opts)
        before += kv_bytes_per_token(a)
        if axis == "channel":
            gs = opts.get("kv_group_size") or (KIVI_VALUE_GROUP if a["head_dim"] % KIVI_VALUE_GROUP == 0 else None)
            tg = opts.get("kv_token_group") or KIVI_TOKEN_GROUP
            res = KIVI_RESIDUAL if opts.get("kv_residual") is None else opts["kv_residual"]
            spec = kv_cache_quant_attrs(bits, a["num_kv_heads"], a["head_dim"], gs, sym, "float16", "channel", tg, res)
        else:
            spec = kv_cache_quant_attrs(bits, a["num_kv_heads"], a["head_dim"], opts.get("kv_group_size"), sym,
                                        "float16")
        a["kv_cache"] = {**{k: v for k, v in a["kv_cache"].items() if k != "quant"}, **spec}
        after += kv_bytes_per_token(a)
        axes[spec["quant"]["granularity"]] = axes.get(spec["quant"]["granularity"], 0) + 1
    shown = "; ".join(f"{grain} ({n} layers)" if len(axes) > 1 else grain for grain, n in axes.items())
    return (f"KV cache: int{bits} {'sym' if sym else 'asym'}, {shown}, float16 scales, "
            f"{before:,.0f} → {after:,.0f} bytes/token ({after / before:.3f}×)")
