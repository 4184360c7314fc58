"""The ``quantize`` pass: int8/int4 weights (RTN or GPTQ) and an int8/int4 KV cache.

Weights become :class:`~tokopt.optimizer.ir.weights.QuantizedWeight` values (packed codes,
scales, zero points) that every executor dequantizes exactly; the KV cache becomes an
integer ``kv_cache.dtype`` with per-token scales that the reference attention honours
in prefill and decode.  Calibrated quantization (GPTQ) runs the model block by block on
calibration text, so memory stays one block deep and results are reproducible per seed.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from dataclasses import dataclass

import torch

from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer.ir.attrs import act_quant_attr, kv_cache_quant_attrs
from tokopt.optimizer.ir.graph import Graph, Node, Value
from tokopt.optimizer.ir.ops import kv_bytes_per_token
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize, weight_nbytes, weight_shape
from tokopt.optimizer.pass_api import Option, Pass, PassContext, PassResult, at_least
from tokopt.passes.quant.calibration import BlockwiseRunner
from tokopt.passes.quant.gptq import gptq_quantize, search_grid
from tokopt.passes.quant.rtn import SCALE_DTYPES, quantize_rtn

log = logging.getLogger(__name__)

GROUP_SIZES = (-1, 0, 16, 32, 64, 128, 256)
_CANDIDATE_GROUPS = (16, 32, 64, 128, 256)


def _damp(value: float) -> str | None:
    return None if 0.0 < value < 1.0 else "must be in (0, 1), e.g. 0.01"


@dataclass(frozen=True)
class _Target:
    """One parameter to quantize and the nodes that read it."""

    param: str
    nodes: tuple[str, ...]
    bits: int
    calibrate: bool  # GPTQ through a Linear's inputs (False: grid fitted on the weight alone)


class QuantizePass(Pass):
    """Store weights as int8/int4 codes with group scales, and/or quantize the KV cache.

    ``method=rtn`` rounds to nearest; ``method=gptq`` (the default for 4 bits through
    ``auto``) picks codes that keep each Linear's outputs close on calibration text, with
    activation-ordered columns, static contiguous groups and a clipping search.  The token
    embedding and ``lm_head`` are governed by their own switches; when they share one
    tensor (tied, as in SmolLM2) it is quantized once and both read the same codes — if
    only one of them is selected, that one gets its own quantized copy and the other
    keeps the float tensor.  MoE expert stacks are left as they are.
    """

    name = "quantize"
    summary = "int8/int4 weights (RTN or GPTQ, per-channel or grouped) and an int8/int4 KV cache"
    options = (
        Option("bits", "int", 8, "Weight bits.", choices=(8, 4)),
        Option("group_size", "int", -1,
               "Input columns sharing one scale: -1 or 0 = per output channel; must divide every selected "
               "layer's input width.", choices=GROUP_SIZES),
        Option("symmetric", "bool", True, "Symmetric grid (no zero points) or asymmetric (uint8 zero per group)."),
        Option("method", "str", "auto",
               "rtn: round to nearest; gptq: calibrated, error-compensating; auto: rtn for 8 bits, gptq for 4.",
               choices=("auto", "rtn", "gptq")),
        Option("weights", "bool", True, "Quantize weights at all (false: only the KV cache, with kv_bits)."),
        Option("include", "str_list", ["*"], "fnmatch patterns over node names to quantize, ';'-separated "
               "(e.g. 'layers.*.mlp.*')."),
        Option("exclude", "str_list", [], "fnmatch patterns over node names to keep in float, ';'-separated."),
        Option("embeddings", "bool", True, "Quantize Embedding tables (rows are dequantized at lookup)."),
        Option("lm_head", "bool", True, "Quantize the Linear that produces the logits (tied to the embedding in "
               "many models: then both share one quantized tensor)."),
        Option("embedding_bits", "int", None, "Bits for the embedding and lm_head; default: bits.", choices=(8, 4)),
        Option("scale_dtype", "str", "float16", "Storage type of the scales.", choices=("float16", "float32")),
        Option("damp", "float", 0.01, "GPTQ: Hessian dampening, as a fraction of its mean diagonal.", check=_damp),
        Option("act_order", "bool", True, "GPTQ: quantize columns in order of decreasing input energy."),
        Option("calibration_samples", "int", 8, "Sequences of calibration text, when the pipeline gives none.",
               check=at_least(1)),
        Option("calibration_seq_len", "int", 512, "Tokens per calibration sequence, when the pipeline gives none.",
               check=at_least(1)),
        Option("act_bits", "int", None,
               "Also quantize each quantized Linear's input to int8 at run time, per block of its weight group "
               "(w4a8/w8a8): onnxruntime's fastest CPU path (MatMulNBits accuracy_level 4). Default: float inputs.",
               choices=(8,)),
        Option("kv_bits", "int", None, "Quantize the KV cache to this many bits (default: leave it).",
               choices=(8, 4)),
        Option("kv_group_size", "int", None, "Head dimensions sharing one KV scale; default: the whole head "
               "(per token, per head). Must divide head_dim.", check=at_least(1)),
        Option("kv_symmetric", "bool", None, "Symmetric KV grid; default: true for 8 bits, false for 4."),
    )
    moves = ("weight_bytes", "bits_per_param", "decode_tok_s_bound", "kv_bytes_per_token", "ppl")

    def validate(self) -> None:
        o = self.opts
        if not o["weights"] and o["kv_bits"] is None:
            raise PassOptionError("quantize: weights=false and no kv_bits: nothing to do; set kv_bits=8 (or 4), "
                                  "or drop weights=false")
        if o["act_bits"] is not None and not o["weights"]:
            raise PassOptionError("quantize: act_bits quantizes the inputs of quantized Linears; it needs "
                                  "weights=true")
        if o["kv_bits"] is None and (o["kv_group_size"] is not None or o["kv_symmetric"] is not None):
            raise PassOptionError("quantize: kv_group_size/kv_symmetric need kv_bits (8 or 4)")

    @property
    def method(self) -> str:
        o = self.opts
        if o["method"] != "auto":
            return o["method"]
        return "gptq" if 4 in (o["bits"], o["embedding_bits"] or o["bits"]) else "rtn"

    # -- planning ---------------------------------------------------------------------
    def _selected_nodes(self, graph: Graph) -> dict[str, str]:
        """Node name → role (linear, lm_head, embedding) for every node whose weight is quantized."""
        o = self.opts
        outputs = set(graph.outputs.values())
        chosen: dict[str, str] = {}
        for node in graph.nodes():
            if node.op == "Linear":
                role = "lm_head" if Value(node.name, 0) in outputs else "linear"
            elif node.op == "Embedding":
                role = "embedding"
            else:
                continue
            if (role == "lm_head" and not o["lm_head"]) or (role == "embedding" and not o["embeddings"]):
                continue
            if not any(fnmatch.fnmatchcase(node.name, p) for p in o["include"]):
                continue
            if any(fnmatch.fnmatchcase(node.name, p) for p in o["exclude"]):
                continue
            w = graph.params[node.params["weight"]]
            if isinstance(w, QuantizedWeight) or len(weight_shape(w)) != 2:
                continue
            chosen[node.name] = role
        return chosen

    def _plan(self, graph: Graph) -> list[_Target]:
        if not self.opts["weights"]:
            return []
        o = self.opts
        chosen = self._selected_nodes(graph)
        self._check_group_size(graph, chosen)
        calibrated = self.method == "gptq"
        by_param: dict[str, list[str]] = {}
        for name in chosen:
            by_param.setdefault(graph.node(name).params["weight"], []).append(name)
        targets = []
        for pname, nodes in by_param.items():
            roles = {chosen[n] for n in nodes}
            bits = (o["embedding_bits"] or o["bits"]) if roles & {"embedding", "lm_head"} else o["bits"]
            calibrate = calibrated and any(graph.node(n).op == "Linear" for n in nodes)
            targets.append(_Target(pname, tuple(nodes), bits, calibrate))
        return targets

    def _check_group_size(self, graph: Graph, chosen: dict[str, str]) -> None:
        gs = self.opts["group_size"]
        if gs <= 0 or not chosen:
            return
        widths = {n: weight_shape(graph.params[graph.node(n).params["weight"]])[1] for n in chosen}
        bad = [(n, w) for n, w in widths.items() if w % gs]
        if not bad:
            return
        common = math.gcd(*widths.values())
        working = [str(g) for g in _CANDIDATE_GROUPS if common % g == 0]
        shown = ", ".join(f"{n} (in_features {w})" for n, w in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise PassOptionError(
            f"quantize: group_size={gs} does not divide the input width of {shown}{more}; group sizes that divide "
            f"every selected layer: {', '.join(working + ['-1 (per-channel)'])}; or leave those layers out with "
            f"exclude=...")

    def check(self, graph: Graph, ctx: PassContext) -> None:
        o = self.opts
        self._plan(graph)  # selection and group-size errors surface before any expensive work
        attention = graph.nodes("Attention")
        if o["kv_bits"] is not None:
            if not attention:
                raise PreconditionError("quantize: kv_bits needs Attention nodes; this model has none")
            gs = o["kv_group_size"]
            bad = sorted({n.attrs["head_dim"] for n in attention if gs and n.attrs["head_dim"] % gs})
            if bad:
                raise PassOptionError(f"quantize: kv_group_size={gs} does not divide head_dim {bad[0]}; use a divisor "
                                      f"of {bad[0]} (e.g. {bad[0] // 2}) or leave it unset for per-head scales")
        if ctx.backend and ctx.backend_capabilities:
            self._check_backend(ctx.backend, ctx.backend_capabilities)

    def _check_backend(self, backend: str, capabilities: dict[str, dict]) -> None:
        """Refuse a KV dtype the backend cannot store (``capabilities()["kv_dtypes"]``), naming those that can."""
        o = self.opts
        caps = capabilities.get(backend) or {}
        if o["kv_bits"] is not None:
            want = f"int{o['kv_bits']}"
            if want not in (caps.get("kv_dtypes") or []):
                able = [n for n, c in sorted(capabilities.items()) if want in (c.get("kv_dtypes") or [])]
                raise PreconditionError(
                    f"quantize: backend {backend!r} cannot store an {want} KV cache (supports "
                    f"{', '.join(caps.get('kv_dtypes') or ['float only'])}); backends that can: "
                    f"{', '.join(able) or 'none installed'}; or drop kv_bits")

    # -- run ----------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.opts
        g = graph.copy()
        notes: list[str] = []
        if o["kv_bits"] is not None:
            notes.append(self._quantize_kv(g))
        targets = self._plan(g)
        if not targets and o["kv_bits"] is None:
            return PassResult(g, False, ["no weight matched the include/exclude patterns; nothing changed"])
        if targets:
            before = sum(weight_nbytes(g.params[t.param]) for t in targets)
            started = time.perf_counter()
            untied = self._untie(g, targets)
            if untied:
                notes.append(f"untied {', '.join(untied)}: only some of its users were selected")
                targets = self._plan(g)
            quantized = self._quantize_weights(g, targets, ctx)
            after = sum(weight_nbytes(g.params[t.param]) for t in targets)
            grid = f"int{o['bits']}" + (f" (embedding/lm_head int{o['embedding_bits']})" if o["embedding_bits"] else "")
            group = "per-channel" if o["group_size"] <= 0 else f"group {o['group_size']}"
            notes.append(
                f"weights: {quantized} tensors → {grid} {group} {'sym' if o['symmetric'] else 'asym'} "
                f"({self.method}), {before / 1e6:.1f} MB → {after / 1e6:.1f} MB in "
                f"{time.perf_counter() - started:.0f} s")
            tied = [t.param for t in targets if len(t.nodes) > 1]
            if tied:
                notes.append(f"shared tensors quantized once: {', '.join(tied)}")
            if o["act_bits"] is not None:
                notes.append(self._quantize_activations(g, targets))
        g.reinfer()
        return PassResult(g, True, notes)

    def _untie(self, g: Graph, targets: list[_Target]) -> list[str]:
        """Give selected readers of a tensor also read by unselected nodes their own copy."""
        untied = []
        for t in targets:
            readers = [n.name for n in g.nodes() if t.param in n.params.values()]
            if set(readers) <= set(t.nodes):
                continue
            copy_name = f"{t.param}.int{t.bits}"
            g.params[copy_name] = g.params[t.param]
            for name in t.nodes:
                node = g.node(name)
                node.params = {r: (copy_name if p == t.param else p) for r, p in node.params.items()}
            untied.append(t.param)
        return untied

    def _quantize_weights(self, g: Graph, targets: list[_Target], ctx: PassContext) -> int:
        o = self.opts
        sdtype = SCALE_DTYPES[o["scale_dtype"]]
        common = dict(group_size=o["group_size"], symmetric=o["symmetric"], scale_dtype=o["scale_dtype"])
        calibrated = [t for t in targets if t.calibrate]
        for t in targets:
            if t in calibrated:
                continue
            w = materialize(g.params[t.param], torch.float32)
            if self.method == "gptq":  # no Linear reads it (an embedding): fit the grid on the weight itself
                gs = o["group_size"] if o["group_size"] > 0 else w.shape[1]
                scale, zero = search_grid(w, torch.ones(w.shape[1]), t.bits, gs, o["symmetric"], sdtype)
                g.params[t.param] = _from_grid(w, scale, zero, t.bits, gs, o["symmetric"], o["scale_dtype"])
            else:
                g.params[t.param] = quantize_rtn(w, t.bits, **common)
        if calibrated:
            self._gptq(g, calibrated, ctx)
        return len(targets)

    def _gptq(self, g: Graph, targets: list[_Target], ctx: PassContext) -> None:
        o = self.opts
        given = ctx.calibration_batches  # all of the pipeline's text, as cut; else the option's sizes
        batches = ctx.calibration(g, len(given) or o["calibration_samples"],
                                  given[0].shape[-1] if given else o["calibration_seq_len"], self.name)
        runner = BlockwiseRunner(g, batches)
        for name, w in g.params.items():  # tensors quantized without calibration: later blocks see their error
            if isinstance(w, QuantizedWeight):
                runner.set_weight(name, w)
        owner = {n: t for t in targets for n in t.nodes if g.node(n).op == "Linear"}
        pending = {t.param for t in targets}

        def before(node: Node) -> bool:
            """Quantize every pending weight reading this node's input, from the inputs as they are now."""
            if not pending:
                return True  # nothing left to calibrate: the rest of the model need not run
            t = owner.get(node.name)
            if t is None or t.param not in pending:
                return False
            value = runner.input_value(node.name)
            hessian = runner.hessian(value)
            for name in [n for n in owner if runner.input_value(n) == value]:  # q/k/v share one Hessian
                t = owner[name]
                if t.param not in pending:
                    continue
                w = materialize(g.params[t.param], torch.float32)
                q = gptq_quantize(w, hessian, t.bits, o["group_size"], o["symmetric"], o["scale_dtype"],
                                  damp=o["damp"], act_order=o["act_order"])
                g.params[t.param] = q
                runner.set_weight(t.param, q)
                pending.discard(t.param)
            return False

        for idx in ctx.progress(range(len(runner.segments)), desc="gptq"):
            if not pending:
                break
            started = time.perf_counter()
            left = len(pending)
            runner.run(idx, before)
            log.info("gptq segment %d/%d (%s): %d tensor(s) in %.1f s", idx + 1, len(runner.segments),
                     runner.segments[idx][0].name, left - len(pending), time.perf_counter() - started)

    def _quantize_activations(self, g: Graph, targets: list[_Target]) -> str:
        """Mark every quantized Linear to quantize its input per block of its weight's group."""
        blocks = set()
        linears = [g.node(n) for t in targets for n in t.nodes if g.node(n).op == "Linear"]
        for node in linears:
            block = g.params[node.params["weight"]].group_size
            node.attrs["act_quant"] = act_quant_attr(self.opts["act_bits"], block)
            blocks.add(block)
        return (f"activations: int{self.opts['act_bits']} per block of {'/'.join(map(str, sorted(blocks)))} "
                f"on {len(linears)} Linears")

    def _quantize_kv(self, g: Graph) -> str:
        o = self.opts
        bits = o["kv_bits"]
        sym = o["kv_symmetric"] if o["kv_symmetric"] is not None else bits == 8
        before = after = 0.0
        for node in g.nodes("Attention"):
            a = node.attrs
            before += kv_bytes_per_token(a)
            a["kv_cache"] = {**a["kv_cache"], **kv_cache_quant_attrs(
                bits, a["num_kv_heads"], a["head_dim"], o["kv_group_size"], sym, "float16")}
            after += kv_bytes_per_token(a)
        spec = g.nodes("Attention")[0].attrs["kv_cache"]["quant"]
        return (f"KV cache: int{bits} {'sym' if sym else 'asym'}, {spec['granularity']} float16 scales, "
                f"{before:,.0f} → {after:,.0f} bytes/token ({after / before:.3f}×)")


def _from_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
               symmetric: bool, scale_dtype: str) -> QuantizedWeight:
    from tokopt.passes.quant.rtn import quantize_codes, quantized_weight

    out_f, in_f = w.shape
    grouped = w.reshape(out_f, in_f // group_size, group_size)
    codes = quantize_codes(grouped, scale[..., None], zero[..., None], bits).reshape(out_f, in_f)
    return quantized_weight(codes, scale, zero, bits, group_size, symmetric, SCALE_DTYPES[scale_dtype], "mse",
                            {"scale_dtype": scale_dtype})
