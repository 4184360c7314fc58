"""The ``quantize`` pass: int8/int4 weights (RTN or GPTQ), int8 activations, an int8/int4 KV cache.

This page holds the options, the checks and the plan (which tensors, at which bits); the work
is in :mod:`tokopt.passes.quant`: ``weights`` (RTN/GPTQ), ``activations`` (``act_quant``) and
``kv`` (the cache format), each checked against its definition in the tests.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from dataclasses import dataclass

from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer.ir.graph import Graph, Value
from tokopt.optimizer.ir.weights import QuantizedWeight, streams, weight_nbytes, weight_shape
from tokopt.optimizer.pass_api import Option, Pass, PassContext, PassResult, at_least
from tokopt.passes.quant.activations import quantize_activations, round_activations
from tokopt.passes.quant.kv import check_kv_options, quantize_kv_cache
from tokopt.passes.quant.mixed import check_budget, plan_mixed
from tokopt.passes.quant.rotation import NotRotatable, rotate_residual, rotate_value_heads
from tokopt.passes.quant.weights import Target, planned_weight, quantize_weights, untie


@dataclass(frozen=True)
class Formats:
    """The pass's formats for one graph and target, unset options resolved (:meth:`QuantizePass.formats`)."""

    group_size: int
    act_bits: int | None
    act_dtype: str | None
    scale_dtype: str

log = logging.getLogger(__name__)

GROUP_SIZES = (-1, 0, 16, 32, 64, 128, 256)
AUTO_INT4_GROUP = 32  # group_size of 4-bit weights when not given: onnxruntime's and llama.cpp's int4 block
AUTO_INT8_GROUPS = (64, 32, 16)  # 8-bit groups tried in order when int8 activations are on (per-channel otherwise)
AUTO_ACT_BITS_BACKENDS = ("onnxruntime",)  # targets whose fast int4/int8 kernels quantize activations
FLOAT32_SCALE_BACKENDS = ("onnxruntime",)  # targets that store quantization scales as float32
AUTO_BF16_BACKENDS = ("torch-compile",)  # targets whose low-bit kernels take bfloat16 inputs and scales
_CANDIDATE_GROUPS = (16, 32, 64, 128, 256)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def _damp(value: float) -> str | None:
    return None if 0.0 < value < 1.0 else "must be in (0, 1), e.g. 0.01"


class QuantizePass(Pass):
    """Store weights as int8/int4 codes with group scales, and/or quantize the KV cache.

    ``method=rtn`` rounds to nearest; ``method=gptq`` (the default for 4 bits through
    ``auto``) picks codes that keep each Linear's outputs close on calibration text, with
    activation-ordered columns, static contiguous groups and a clipping search, after folding a
    Hadamard rotation of the residual stream and of each head's values into the weights
    (``rotate``: exact in float, it evens out the columns each group scale fits).  The token
    embedding and ``lm_head`` are governed by their own switches; when they share one
    tensor (tied, as in SmolLM2) it is quantized once and both read the same codes — if
    only one of them is selected, that one gets its own quantized copy and the other
    keeps the float tensor.  MoE expert stacks (and shared experts) are quantized row by row in
    the same format, their grid fitted on the weights (GPTQ calibrates the Linears: routed
    experts see too few calibration tokens each); routers stay in float.
    """

    name = "quantize"
    summary = "int8/int4 weights (RTN or GPTQ, per-channel or grouped) and an int8/int4 KV cache"
    options = (
        Option("bits", "int", None, "Weight bits; default 8, or no weight quantization when only kv_bits is given.",
               choices=(8, 4)),
        Option("group_size", "int", None,
               "Input columns sharing one scale: -1 or 0 = per output channel; must divide every selected "
               "layer's input width.  Default: 32 for 4 bits (the block onnxruntime's and llama.cpp's int4 kernels "
               "use; one scale per row loses far more at 4 bits); for 8 bits with int8 activations (onnxruntime's "
               "default) the first of 64/32/16 that divides every width, whose int8 kernel is ~2x faster than "
               "float-accuracy per-channel int8 — else per-channel.", choices=GROUP_SIZES),
        Option("symmetric", "bool", True, "Symmetric grid (no zero points) or asymmetric (uint8 zero per group)."),
        Option("method", "str", "auto",
               "rtn: round to nearest; gptq: calibrated, error-compensating; auto: rtn for 8 bits, gptq for 4.",
               choices=("auto", "rtn", "gptq")),
        Option("weights", "bool", None, "Quantize weights at all (false: only the KV cache, with kv_bits).  "
               "Default: true, unless kv_bits is given without bits."),
        Option("budget_bits", "float", None,
               "Mixed precision: measure each tensor's sensitivity (estimated KL of quantizing it alone, on "
               "calibration text) and move the most sensitive ones to int8 until the model averages this many "
               "bits per parameter, scales and zeros included (e.g. bits=4,budget_bits=4.75).", check=_positive),
        Option("max_kl", "float", None, "Mixed precision: the fewest bytes whose estimated KL (nats/token) is "
               "within this; with budget_bits, both hold.", check=_positive),
        Option("sensitivity_samples", "int", 4, "Mixed precision: calibration sequences for the sensitivities.",
               check=at_least(1)),
        Option("include", "str_list", ["*"], "fnmatch patterns over node names to quantize, ';'-separated "
               "(e.g. 'layers.*.mlp.*')."),
        Option("exclude", "str_list", [], "fnmatch patterns over node names to keep in float, ';'-separated."),
        Option("embeddings", "bool", True, "Quantize Embedding tables (rows are dequantized at lookup)."),
        Option("experts", "bool", True, "Quantize MoE expert stacks and shared experts (grid fitted on the "
               "weights; the router stays in float)."),
        Option("lm_head", "bool", True, "Quantize the Linear that produces the logits (tied to the embedding in "
               "many models: then both share one quantized tensor)."),
        Option("embedding_bits", "int", None, "Bits for the embedding and lm_head; default: bits.", choices=(8, 4)),
        Option("scale_dtype", "str", None, "Storage type of the scales.  Default: float32 when the target is "
               "onnxruntime (MatMulNBits reads float32 scales beside float32 activations, so the artifact stores "
               "them so and the IR's bytes are the artifact's), bfloat16 with act_dtype=bfloat16 (what torch's "
               "low-bit kernels read), float16 otherwise.", choices=("float16", "float32", "bfloat16")),
        Option("damp", "float", 0.01, "GPTQ: Hessian dampening, as a fraction of its mean diagonal.", check=_damp),
        Option("act_order", "bool", True, "GPTQ: quantize columns in order of decreasing input energy."),
        Option("fp_target", "bool", None, "GPTQ: fit each layer to the float model's output from the inputs the "
               "quantized model gives it, correcting the drift earlier layers' error causes (GPTAQ's asymmetric "
               "calibration: a ridge fit from the float model's run on the same calibration text; SmolLM2's GPTQ takes "
               "124 s instead of ~75 s).  Default: on, unless the model is past the memory budget (its weights "
               "would be read twice per block) or the calibration text has fewer than 4 tokens per input feature "
               "of the widest Linear (the fit would chase its noise)."),
        Option("rotate", "bool", None, "GPTQ: first fold an orthogonal rotation into the weights (QuaRot's "
               "Hadamard rotation of the residual stream and of each head's values; exact in float, nothing added at "
               "run time except, for a lm_head tied to the embedding, one hidden x hidden float Linear after the "
               "final norm).  SmolLM2 int4: prose -3.4 points, docstrings +0.75.  Default: on with GPTQ when "
               "the model fits the memory budget and its stream allows it (else skipped, with the reason in the "
               "notes); off with RTN, which it hurts."),
        Option("calibration_samples", "int", 8, "Sequences of calibration text, when the pipeline gives none.",
               check=at_least(1)),
        Option("calibration_seq_len", "int", 512, "Tokens per calibration sequence, when the pipeline gives none.",
               check=at_least(1)),
        Option("act_bits", "int", None,
               "Also quantize each quantized Linear's input to int8 at run time, per block of its weight group "
               "(w4a8/w8a8): onnxruntime's fastest CPU path (MatMulNBits accuracy_level 4); its quality cost is "
               "measured like any other.  Default: 8 for weights lowered to onnxruntime (float inputs there cost "
               "~2.6x decode speed at 4 bits, ~2x at 8; 8-bit weights then take groups, see group_size, and keep "
               "float inputs where no group divides the widths or group_size=-1 is given), float inputs otherwise; "
               "0: float inputs always.", choices=(0, 8)),
        Option("act_dtype", "str", None,
               "Precision of each quantized Linear's input and product: bfloat16 rounds both (torch's low-bit CPU "
               "kernels, _weight_int4pack_mm_for_cpu / _weight_int8pack_mm, take bfloat16 inputs; int4 needs "
               "symmetric groups of 32-256, int8 per-channel); its quality cost is measured like any other.  "
               "Default: bfloat16 for weights lowered to torch-compile (without it the compiled session runs "
               "dequantized float32 weights), float32 otherwise; exclusive with act_bits.",
               choices=("float32", "bfloat16")),
        Option("kv_bits", "int", None, "Quantize the KV cache to this many bits (default: leave it).",
               choices=(8, 4)),
        Option("kv_group_size", "int", None, "Head dimensions sharing one V scale (and one K scale with "
               "kv_key_axis=token); default: 64 with per-channel keys (4 bits; the whole head if 64 does not "
               "divide it), else the whole head (per token, per head). Must divide head_dim.", check=at_least(1)),
        Option("kv_symmetric", "bool", None, "Symmetric KV grid; default: true for 8 bits, false for 4 (per-channel "
               "keys are always asymmetric: scale + min)."),
        Option("kv_key_axis", "str", None, "channel: KIVI keys, one scale + min per channel over kv_token_group "
               "positions, the newest tokens read in full precision; token: keys per token like values.  Default: "
               "channel for 4 bits on layers without a sliding window, token otherwise.",
               choices=("channel", "token")),
        Option("kv_token_group", "int", None, "Per-channel keys: positions sharing one scale (G); default 32.",
               check=at_least(1)),
        Option("kv_residual", "int", None, "Per-channel keys: newest tokens always read in full precision (R; "
               "G*floor((t+1-R)/G) is the first position a query at t reads in full precision); default 0.",
               check=at_least(0)),
    )
    moves = ("weight_bytes", "bits_per_param", "decode_tok_s_bound", "kv_bytes_per_token", "ppl")
    _float_nodes: tuple[str, ...] = ()  # Linears the rotation added (the tied lm_head's final-norm matrix): kept float

    def validate(self) -> None:
        o = self.opts
        if o["weights"] is False and o["kv_bits"] is None:
            raise PassOptionError("quantize: weights=false and no kv_bits: nothing to do; set kv_bits=8 (or 4), "
                                  "or drop weights=false")
        if o["act_bits"] and not self.quantizes_weights:
            raise PassOptionError("quantize: act_bits quantizes the inputs of quantized Linears; it needs "
                                  "weights=true")
        if o["act_dtype"] == "bfloat16" and not self.quantizes_weights:
            raise PassOptionError("quantize: act_dtype rounds the inputs of quantized Linears; it needs weights=true")
        if o["act_dtype"] == "bfloat16" and o["act_bits"]:
            raise PassOptionError("quantize: act_bits=8 and act_dtype=bfloat16 are exclusive (an input is either "
                                  "quantized to int8 or rounded to bfloat16); drop one")
        kv_only = ("kv_group_size", "kv_symmetric", "kv_key_axis", "kv_token_group", "kv_residual")
        if o["kv_bits"] is None and any(o[k] is not None for k in kv_only):
            raise PassOptionError(f"quantize: {'/'.join(k for k in kv_only if o[k] is not None)} need kv_bits (8 or 4)")

    def formats(self, graph: Graph, ctx: PassContext) -> Formats:
        """What the options resolve to for ``graph`` on ``ctx.backend``: an unset option takes the target's fast
        path, and the IR then says so (the report measures what it costs)."""
        o = self.opts
        given_act = o["act_bits"]
        wants_act = given_act == 8 or (given_act is None and self.quantizes_weights
                                        and ctx.backend in AUTO_ACT_BITS_BACKENDS)
        group = o["group_size"]
        if group is None:
            group = self._auto_group_size(graph, wants_act)
        if given_act is not None:
            act_bits = given_act or None
        else:  # int8 per channel has no int8-activation kernel: its auto group is per-channel only without one
            act_bits = 8 if wants_act and (self.bits == 4 or group > 0) else None
        if o["act_dtype"] is not None:
            act_dtype = None if o["act_dtype"] == "float32" else o["act_dtype"]
        else:
            auto_bf16 = self.quantizes_weights and ctx.backend in AUTO_BF16_BACKENDS and not act_bits
            act_dtype = "bfloat16" if auto_bf16 else None
        if o["scale_dtype"] is not None:
            scale_dtype = o["scale_dtype"]
        elif act_dtype == "bfloat16":
            scale_dtype = "bfloat16"
        else:  # what the target stores, so the IR's bytes are the artifact's (float16 widened on disk: +13 %)
            scale_dtype = "float32" if ctx.backend in FLOAT32_SCALE_BACKENDS else "float16"
        return Formats(group, act_bits, act_dtype, scale_dtype)

    def _auto_group_size(self, graph: Graph, int8_activations: bool) -> int:
        """32 for 4 bits; for 8 bits with int8 activations the first of :data:`AUTO_INT8_GROUPS` dividing every
        selected layer's input width (onnxruntime's int8 kernel takes blocks, not channels), else per-channel."""
        if self.bits == 4:
            return AUTO_INT4_GROUP
        if not (int8_activations and self.quantizes_weights):
            return -1
        widths = {weight_shape(graph.params[p])[-1] for n in self._selected_nodes(graph) for p in _weights_of(graph, n)}
        return next((g for g in AUTO_INT8_GROUPS if widths and all(w % g == 0 for w in widths)), -1)

    @property
    def bits(self) -> int:
        return 8 if self.opts["bits"] is None else self.opts["bits"]

    @property
    def quantizes_weights(self) -> bool:
        """The option, or (unset) true unless only the KV cache was asked for (``quantize:kv_bits=8``)."""
        o = self.opts
        if o["weights"] is not None:
            return o["weights"]
        return not (o["kv_bits"] is not None and o["bits"] is None and o["budget_bits"] is None
                    and o["max_kl"] is None)

    @property
    def mixed(self) -> bool:
        return self.opts["budget_bits"] is not None or self.opts["max_kl"] is not None

    @property
    def method(self) -> str:
        o = self.opts
        if o["method"] != "auto":
            return o["method"]
        return "gptq" if 4 in (self.bits, o["embedding_bits"] or self.bits) or self.mixed else "rtn"

    @property
    def rotates(self) -> bool:
        """The option, or (unset) whenever GPTQ quantizes weights: rotation helps its fit and hurts RTN's."""
        o = self.opts
        if o["rotate"] is not None:
            return o["rotate"] and self.quantizes_weights
        return self.quantizes_weights and self.method == "gptq"

    def _rotate(self, g: Graph, ctx: PassContext) -> list[str]:
        """Fold the rotations into ``g``'s weights (:mod:`tokopt.passes.quant.rotation`); notes on what was done."""
        if streams(g.params):
            if self.opts["rotate"]:
                raise PreconditionError("quantize: rotate=true needs the model's float weights in memory, and this "
                                        "one is past the memory budget (TOKOPT_WEIGHT_MEMORY); drop rotate=true")
            return ["not rotated: the model is past the memory budget (rotating would hold every weight in memory)"]
        try:
            self._float_nodes = tuple(rotate_residual(g, ctx.seed))
        except NotRotatable as e:
            if self.opts["rotate"]:
                raise PreconditionError(f"quantize: rotate=true, but the residual stream cannot take a folded "
                                        f"rotation: {e}; drop rotate=true") from e
            return [f"not rotated: {e}"]
        # the value rotation only with the stream's: on its own it was measured neutral on SmolLM2
        heads = rotate_value_heads(g)
        kept = f"; {', '.join(self._float_nodes)} kept in float (the tied table holds the rotated rows)" \
            if self._float_nodes else ""
        return [f"rotated the residual stream and the values of {heads} attention layers (random-sign Hadamard, "
                f"folded into the weights{kept})"]

    # -- planning ---------------------------------------------------------------------
    def _selected_nodes(self, graph: Graph) -> dict[str, str]:
        """Node name → role (linear, lm_head, embedding, experts) for every node whose weights are quantized."""
        o = self.opts
        outputs = set(graph.outputs.values())
        chosen: dict[str, str] = {}
        for node in graph.nodes():
            if node.op == "Linear":
                role = "lm_head" if Value(node.name, 0) in outputs else "linear"
            elif node.op == "Embedding":
                role = "embedding"
            elif node.op == "MoE":
                role = "experts"
            else:
                continue
            if (role == "lm_head" and not o["lm_head"]) or (role == "embedding" and not o["embeddings"]) or \
                    (role == "experts" and not o["experts"]):
                continue
            if node.name in self._float_nodes:
                continue
            if not any(fnmatch.fnmatchcase(node.name, p) for p in o["include"]):
                continue
            if any(fnmatch.fnmatchcase(node.name, p) for p in o["exclude"]):
                continue
            if not _weights_of(graph, node.name):
                continue
            chosen[node.name] = role
        return chosen

    def _plan(self, graph: Graph, group_size: int) -> list[Target]:
        if not self.quantizes_weights:
            return []
        o = self.opts
        chosen = self._selected_nodes(graph)
        self._check_group_size(graph, chosen, group_size)
        calibrated = self.method == "gptq"
        by_param: dict[str, list[str]] = {}
        for name in chosen:
            for pname in _weights_of(graph, name):
                by_param.setdefault(pname, []).append(name)
        targets = []
        for pname, nodes in by_param.items():
            roles = {chosen[n] for n in nodes}
            bits = (o["embedding_bits"] or self.bits) if roles & {"embedding", "lm_head"} else self.bits
            calibrate = calibrated and any(graph.node(n).op == "Linear" for n in nodes)
            targets.append(Target(pname, tuple(nodes), bits, calibrate, group_size, o["symmetric"]))
        return targets

    def _check_group_size(self, graph: Graph, chosen: dict[str, str], gs: int) -> None:
        if gs <= 0 or not chosen:
            return
        widths = {f"{n} {p}" if graph.node(n).op == "MoE" else n: weight_shape(graph.params[p])[-1]
                  for n in chosen for p in _weights_of(graph, n)}
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
        f = self.formats(graph, ctx)
        targets = self._plan(graph, f.group_size)  # selection and group-size errors surface before any expensive work
        if o["budget_bits"] is not None and targets:
            check_budget(graph, targets, o["budget_bits"], f.scale_dtype, bool(f.act_bits))
        attention = graph.nodes("Attention")
        if o["kv_bits"] is not None:
            if not attention:
                raise PreconditionError("quantize: kv_bits needs Attention nodes; this model has none")
            check_kv_options(graph, o)

    def preview(self, graph: Graph, ctx: PassContext) -> Graph:
        """The formats this pass will store — placeholder codes on the meta device, no quantization work."""
        o = self.opts
        g = graph.copy()
        if o["kv_bits"] is not None:
            quantize_kv_cache(g, o)
        f = self.formats(g, ctx)
        targets = self._plan(g, f.group_size)
        if untie(g, targets):
            targets = self._plan(g, f.group_size)
        for t in targets:
            g.params[t.param] = planned_weight(weight_shape(g.params[t.param]), t.bits, t.group_size, t.symmetric,
                                               f.scale_dtype)
        if targets:
            self._mark_activations(g, targets, f, ctx)
        return g

    def _mark_activations(self, g: Graph, targets: list[Target], f: Formats, ctx: PassContext) -> list[str]:
        """Mark the quantized Linears' input format (``act_quant`` or ``act_dtype``); notes on what was chosen."""
        o, notes = self.opts, []
        if f.act_bits:
            notes.append(quantize_activations(g, targets, f.act_bits))
            if o["act_bits"] is None:
                group = f", weights in groups of {f.group_size}" if self.bits == 8 and o["group_size"] is None else ""
                notes.append(f"act_bits=8 chosen for the {ctx.backend} target (its fast int{self.bits} kernel "
                             f"quantizes activations{group}); act_bits=0 keeps float inputs")
        if f.act_dtype:
            notes.append(round_activations(g, targets, f.act_dtype))
            if o["act_dtype"] is None:
                notes.append(f"act_dtype=bfloat16 chosen for the {ctx.backend} target (its low-bit kernels take "
                             "bfloat16 inputs); act_dtype=float32 keeps float32 inputs")
        return notes

    # -- run ----------------------------------------------------------------------------
    def whole_model(self) -> str | None:
        if self.opts["budget_bits"] is not None or self.opts["max_kl"] is not None:
            return "mixed precision's sensitivities backpropagate through the whole model (budget_bits, max_kl)"
        return None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.opts
        g = graph.copy()
        notes: list[str] = []
        tables: dict[str, list[dict]] = {}
        if o["kv_bits"] is not None:
            notes.append(quantize_kv_cache(g, o))
        f = self.formats(g, ctx)
        self._float_nodes = ()
        if self.rotates and self._plan(g, f.group_size):
            notes += self._rotate(g, ctx)
        targets = self._plan(g, f.group_size)
        if not targets and o["kv_bits"] is None:
            return PassResult(g, False, ["no weight matched the include/exclude patterns; nothing changed"])
        if targets:
            before = sum(weight_nbytes(g.params[t.param]) for t in targets)
            started = time.perf_counter()
            untied = untie(g, targets)
            if untied:
                notes.append(f"untied {', '.join(untied)}: only some of its users were selected")
                targets = self._plan(g, f.group_size)
            # run-time int8 activations keep the mirrored symmetric grid (see tokopt.passes.quant.rtn) and are
            # quantized in blocks of each weight's group (mixed precision's int8 candidates follow)
            resolved = {**o, "group_size": f.group_size, "scale_dtype": f.scale_dtype,
                        "mirrored": bool(f.act_bits), "act_blocks": bool(f.act_bits)}
            if self.mixed:
                targets, tables["sensitivity"], note = plan_mixed(g, targets, ctx, resolved)
                notes.append(note)
            quantized, fitted = quantize_weights(g, targets, ctx, resolved, self.method)
            fit_note = ", each layer fitted to the float model's output" if fitted else ""
            after = sum(weight_nbytes(g.params[t.param]) for t in targets)
            grid = f"int{self.bits}" + (f" (embedding/lm_head int{o['embedding_bits']})" if o["embedding_bits"] else "")
            grid += " (mixed with int8)" if self.mixed else ""
            group = "per-channel" if f.group_size <= 0 else f"group {f.group_size}"
            notes.append(
                f"weights: {quantized} tensors → {grid} {group} {'sym' if o['symmetric'] else 'asym'} "
                f"({self.method}{fit_note}), {before / 1e6:.1f} MB → {after / 1e6:.1f} MB in "
                f"{time.perf_counter() - started:.0f} s")
            tied = [t.param for t in targets if len(t.nodes) > 1]
            if tied:
                notes.append(f"shared tensors quantized once: {', '.join(tied)}")
            notes += self._mark_activations(g, targets, f, ctx)
        g.reinfer()
        return PassResult(g, True, notes, tables=tables)


#: The MoE roles holding expert matrices (the router, the shared gate and the biases stay in float).
EXPERT_ROLES = ("experts.gate", "experts.up", "experts.down", "shared.gate", "shared.up", "shared.down")


def _weights_of(graph: Graph, name: str) -> list[str]:
    """The not-yet-quantized weight parameters the pass would quantize in node ``name``."""
    node = graph.node(name)
    roles = EXPERT_ROLES if node.op == "MoE" else ("weight",)
    names = [node.params[r] for r in roles if r in node.params]
    return [p for p in names if not isinstance(w := graph.params[p], QuantizedWeight) and len(weight_shape(w)) >= 2]
