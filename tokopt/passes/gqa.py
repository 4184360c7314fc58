"""gqa: convert attention to fewer KV heads (MHA → GQA, GQA → fewer groups, → MQA).

Runs of consecutive KV heads are merged so that query head ``i`` keeps reading the
merge of its own KV head; the Attention node's ``num_kv_heads`` and the k/v projections
(plus q/o projections when the calibrated merge absorbs its inverse there) change
together.  KV bytes per token shrink by exactly ``old / new`` on converted layers.

``method=mean`` is the baseline of Ainslie et al. (2023); ``method=calibrated`` is the
RoPE-aware closed-form merge fitted on calibration activations (see
:mod:`tokopt.passes.attention.merge`).  ``max_error`` keeps only the layers whose block
output moves by less than that relative error; ``heal_steps`` then distils the converted
model towards the unconverted one (KL on logits) on calibration text.  ``refine_steps``
trains each converted block on its own first (:mod:`tokopt.passes.attention.refine`):
block-local steps are ~30× cheaper than model-level ones.
"""

from __future__ import annotations

import logging

import torch

from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer.ir.graph import Graph, Node, Value
from tokopt.optimizer.ir.ops import kv_bytes_per_token
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize
from tokopt.optimizer.pass_api import Option, Pass, PassContext, PassResult, at_least
from tokopt.passes.attention.block import block_output, relative_error
from tokopt.passes.attention.merge import AttentionWeights, HeadLayout, calibrated_merge, mean_merge
from tokopt.passes.attention.selection import attention_nodes

log = logging.getLogger(__name__)

ROLES = ("q", "k", "v", "o")


class GroupedQueryAttention(Pass):
    """Merge KV heads to ``num_kv_heads`` per layer; optionally heal by distillation.

    Guarantees: each converted Attention node has ``num_kv_heads`` KV heads and its k/v
    projections have matching widths; unconverted layers are untouched; the graph
    verifies.  Without healing, ``mean`` needs no data; ``calibrated``, ``max_error`` and
    ``heal_steps`` use calibration text.
    """

    name = "gqa"
    summary = "Merge KV heads (MHA→GQA→MQA): KV bytes/token shrink by old/new heads; mean or calibrated merge."
    options = (
        Option("num_kv_heads", "int", None, "KV heads per converted layer; must divide the current KV and query heads.",
               check=at_least(1)),
        Option("method", "str", "calibrated", "mean: average each group's K/V rows (Ainslie et al.); "
               "calibrated: RoPE-aware merge fitted on calibration activations.", choices=("mean", "calibrated")),
        Option("layers", "int_list", None, "Layer indices to convert, e.g. 0;2;4-7 (default: all layers)."),
        Option("max_error", "float", None, "Convert only layers whose attention-block output changes by at most "
               "this relative squared error on calibration text (e.g. 0.05).", check=at_least(0)),
        Option("calib_samples", "int", 8, "Calibration sequences used to fit the merge.", check=at_least(1)),
        Option("calib_seq_len", "int", 512, "Tokens per calibration sequence.", check=at_least(1)),
        Option("refine_steps", "int", 0, "Adam steps per converted layer fitting its attention block's output to the "
               "original block's on calibration inputs (0 = none); cheap, runs before healing.", check=at_least(0)),
        Option("refine_lr", "float", 1e-3, "Adam learning rate of refinement.", check=at_least(0)),
        Option("heal_steps", "int", 0, "Distillation steps after merging (0 = no healing).", check=at_least(0)),
        Option("heal_lr", "float", 1e-4, "Peak AdamW learning rate of healing (5e-4 only made SmolLM2 worse).",
               check=at_least(0)),
        Option("heal_seq_len", "int", 128, "Tokens per healing sequence.", check=at_least(1)),
        Option("heal_samples", "int", 512, "Distinct calibration sequences healing cycles through, at most what the "
               "calibration text holds (in `tokopt optimize`: --calib-tokens, default 8x512 = 32 of 128).",
               check=at_least(1)),
        Option("heal_held_out", "int", 4, "Calibration sequences set aside from healing: its KL on them picks the "
               "checkpoint kept (0 = keep the last step).", check=at_least(0)),
        Option("heal_scope", "str", "attention", "Parameters healing trains: the converted layers' q/k/v/o "
               "projections (attention) or every parameter (all).", choices=("attention", "all")),
        Option("seed", "int", 0, "Seed of healing (batch order, initialisation of optimizer state)."),
    )
    requires = frozenset({"attention"})
    moves = ("kv_bytes_per_token", "kv_bytes_at", "params", "ppl")
    changes_numerics = True

    def validate(self) -> None:
        if self.opts["num_kv_heads"] is None:
            raise PassOptionError(f"{self.name}: num_kv_heads is required, e.g. gqa:num_kv_heads=1")

    # -- preconditions ---------------------------------------------------------------
    def check(self, graph: Graph, ctx: PassContext) -> None:
        target = self.opts["num_kv_heads"]
        for node in attention_nodes(graph, self.opts["layers"], self.name):
            h, kvh = node.attrs["num_heads"], node.attrs["num_kv_heads"]
            if target > kvh or kvh % target or h % target:
                raise PreconditionError(
                    f"{self.name}: num_kv_heads={target} must divide {node.name}'s {kvh} KV heads and {h} query "
                    f"heads; valid values: {', '.join(str(n) for n in range(1, kvh + 1) if kvh % n == 0)}")
            if self.opts["method"] == "calibrated" and node.attrs.get("qk_norm"):
                raise PreconditionError(
                    f"{self.name}: {node.name} normalises each key head (qk_norm), which a linear merge cannot pass "
                    "through; use gqa:method=mean (with heal_steps to recover quality)")
            _projections(graph, node, self.name)

    # -- the rewrite -----------------------------------------------------------------
    def whole_model(self) -> str | None:
        if self.opts["heal_steps"]:
            return "healing (heal_steps) trains the student against the teacher with every weight in float32"
        return None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.check(graph, ctx)
        target = self.opts["num_kv_heads"]
        candidates = [n for n in attention_nodes(graph, self.opts["layers"], self.name)
                      if n.attrs["num_kv_heads"] != target]
        if not candidates:
            return PassResult(graph, False, [f"every selected layer already has {target} KV heads"])
        need_data = (self.opts["method"] == "calibrated" or self.opts["max_error"] is not None
                     or self.opts["refine_steps"] > 0)
        captured = self._capture(graph, ctx, candidates) if need_data else {}

        out = graph.copy()
        converted: list[tuple[Node, dict[str, str]]] = []
        notes: list[str] = []
        before = sum(kv_bytes_per_token(n.attrs) for n in graph.nodes("Attention"))
        for node in ctx.progress(candidates, desc="gqa merge"):
            proj = _projections(graph, node, self.name)
            w = _load(graph, proj)
            lay = _layout(node, target)
            x = captured.get(node.name)
            merged = calibrated_merge(w, lay, x) if self.opts["method"] == "calibrated" else mean_merge(w, lay)
            if self.opts["refine_steps"]:
                merged = self._refine(graph, node, w, merged, target, x)
            error = None
            if x is not None:
                error = self._block_error(graph, node, w, merged, target, x)
            if self.opts["max_error"] is not None and error > self.opts["max_error"]:
                notes.append(f"{node.name}: kept {node.attrs['num_kv_heads']} KV heads (error {error:.3g} > "
                             f"max_error {self.opts['max_error']})")
                continue
            new_node = out.node(node.name)
            names = _write_back(out, proj, w, merged)
            new_node.attrs["num_kv_heads"] = target
            cache = dict(new_node.attrs["kv_cache"])
            if cache.get("scale_bytes_per_token"):
                cache["scale_bytes_per_token"] = cache["scale_bytes_per_token"] * target // node.attrs["num_kv_heads"]
            new_node.attrs["kv_cache"] = cache
            converted.append((new_node, names))
            err = f", block error {error:.3g}" if error is not None else ""
            log.info("gqa: %s %d -> %d KV heads%s", node.name, node.attrs["num_kv_heads"], target, err)
            notes.append(f"{node.name}: {node.attrs['num_kv_heads']}→{target} KV heads ({self.opts['method']}{err})")
        if not converted:
            return PassResult(graph, False, notes + ["no layer met max_error; nothing converted"])
        out.eliminate_dead_code()
        out.reinfer()
        after = sum(kv_bytes_per_token(n.attrs) for n in out.nodes("Attention"))
        notes.insert(0, f"{len(converted)} layer(s) converted with method={self.opts['method']}: KV bytes/token "
                        f"{before:,.0f} → {after:,.0f} ({after / before:.3f}×)")
        if any(isinstance(graph.params[p], QuantizedWeight) for n in candidates
               for lin in _projections(graph, n, self.name).values() for p in lin.params.values()):
            notes.append("quantized q/k/v/o weights were merged in fp32 (dequantized): run quantize after gqa")
        if self.opts["heal_steps"]:
            out = self._heal(graph, out, converted, ctx, notes)
        return PassResult(out, True, notes)

    def _capture(self, graph: Graph, ctx: PassContext, nodes: list[Node]) -> dict[str, torch.Tensor]:
        """Inputs of each candidate's k projection on calibration text, (1, tokens, hidden)."""
        batches = ctx.calibration(graph, self.opts["calib_samples"], self.opts["calib_seq_len"], self.name)
        if not batches:
            raise PreconditionError(f"{self.name}: no calibration text long enough for {self.opts['calib_seq_len']} "
                                    "tokens; lower calib_seq_len")
        k_nodes = {_projections(graph, n, self.name)["k"].name: n.name for n in nodes}
        got = ctx.capture_inputs(graph, set(k_nodes), batches)
        return {k_nodes[k]: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).unsqueeze(0) for k, v in got.items()}

    def _refine(self, graph: Graph, node: Node, w: AttentionWeights, merged: AttentionWeights, target: int,
                x: torch.Tensor) -> AttentionWeights:
        from tokopt.passes.attention.refine import refine_block

        norms = {r: materialize(graph.params[p]).float() for r, p in node.params.items()}
        refined, first, last = refine_block(
            node, node.attrs, {**node.attrs, "num_kv_heads": target}, w, merged, x, norms,
            steps=self.opts["refine_steps"], lr=self.opts["refine_lr"],
            seq_len=min(self.opts["calib_seq_len"], x.shape[1]), seed=self.opts["seed"])
        log.info("gqa: %s refined %d steps: block error %.4g -> %.4g", node.name, self.opts["refine_steps"],
                 first, last)
        return refined

    def _block_error(self, graph: Graph, node: Node, w: AttentionWeights, merged: AttentionWeights, target: int,
                     x: torch.Tensor) -> float:
        """Relative error of the block output on the first calibration sequence (positions restart per sequence)."""
        seq = min(self.opts["calib_seq_len"], x.shape[1])
        xs = x[:, :seq].float()
        norms = {r: materialize(graph.params[p]).float() for r, p in node.params.items()}
        with torch.no_grad():
            ref = block_output(node, node.attrs, w, xs, norms)
            new = block_output(node, {**node.attrs, "num_kv_heads": target}, merged, xs, norms)
        return relative_error(ref, new)

    def _heal(self, teacher: Graph, student: Graph, converted: list[tuple[Node, dict[str, str]]], ctx: PassContext,
              notes: list[str]) -> Graph:
        from tokopt.passes.attention.trainable import heal

        if self.opts["heal_scope"] == "all":
            trainable = {p for p, w in student.params.items() if materialize(w).is_floating_point()}
        else:
            trainable = {p for _, names in converted for p in names.values()}
        held = self.opts["heal_held_out"]
        batches = ctx.calibration(student, self.opts["heal_samples"] + held, self.opts["heal_seq_len"],
                                      self.name)
        if len(batches) <= held:
            raise PreconditionError(f"{self.name}: {len(batches)} calibration sequences of {self.opts['heal_seq_len']} "
                                    f"tokens leave none to heal on after heal_held_out={held}; give more calibration "
                                    "text, a shorter heal_seq_len or a smaller heal_held_out")
        train, held_out = batches[:len(batches) - held], batches[len(batches) - held:]
        tensors, report = heal(teacher, student, trainable, train, self.opts["heal_steps"], self.opts["heal_lr"],
                               self.opts["seed"], held_out)
        summary = (f"healed {report.steps} steps on {len(train)} sequences, {len(trainable)} tensors: training KL "
                   f"{report.first_kl:.3f} → {report.last_kl:.3f}")
        if held_out:
            summary += (f"; held-out KL {report.held_out_first:.3f} → {report.held_out_best:.3f}, "
                        f"kept step {report.best_step} of {report.steps}")
        if report.best_step == 0:
            notes.append(summary + " (healing did not lower the held-out KL: unhealed weights kept)")
            return student
        healed = student.copy()
        renamed = {old: _fresh(healed, f"{old}.healed") for old in tensors}
        for old, new in renamed.items():
            healed.add_param(new, tensors[old])
        for node in healed.nodes():
            node.params = {role: renamed.get(p, p) for role, p in node.params.items()}
        healed.eliminate_dead_code()
        notes.append(summary)
        return healed


# -- graph plumbing ----------------------------------------------------------------------
def _projections(graph: Graph, node: Node, pass_name: str) -> dict[str, Node]:
    """The q/k/v Linear producers and the o_proj Linear consumer of an Attention node."""
    ins = graph.inputs_of(node.name)
    proj = {role: graph.producer(v) for role, v in zip("qkv", ins, strict=False)}
    users = graph.users_of(Value(node.name, 0))
    if len(users) == 1:
        proj["o"] = graph.node(users[0][0])
    bad = [r for r in ROLES if r not in proj or proj[r].op != "Linear"]
    if bad:
        found = ", ".join(f"{r} from {proj[r].op} {proj[r].name}" if r in proj else f"{r}: no single consumer"
                          for r in bad)
        raise PreconditionError(f"{pass_name}: {node.name} must read q/k/v from Linear nodes and feed one Linear "
                                f"output projection; here {found} (a norm over the whole projection, as in OLMo 2, "
                                "mixes the heads a merge would have to keep apart)")
    return proj


def _load(graph: Graph, proj: dict[str, Node]) -> AttentionWeights:
    def t(role: str, which: str) -> torch.Tensor | None:
        name = proj[role].params.get(which)
        return None if name is None else materialize(graph.params[name], torch.float32)

    return AttentionWeights(*(t(r, p) for r in ROLES for p in ("weight", "bias")))


def _layout(node: Node, target: int) -> HeadLayout:
    a = node.attrs
    rope = a.get("rope")
    return HeadLayout(a["num_heads"], a["num_kv_heads"], a["head_dim"], target, rope["rotary_dim"] if rope else 0)


def _fresh(graph: Graph, base: str) -> str:
    name, i = base, 1
    while name in graph.params:
        i += 1
        name = f"{base}{i}"
    return name


def _write_back(graph: Graph, proj: dict[str, Node], old: AttentionWeights, new: AttentionWeights) -> dict[str, str]:
    """Point each changed projection at fresh parameters; returns ``role.weight|bias`` -> parameter name.

    Unchanged tensors keep their parameter (mean pooling leaves q and o alone) but are still
    listed, because healing trains every projection of a converted layer.
    """
    names: dict[str, str] = {}
    for role in ROLES:
        node = graph.node(proj[role].name)
        for which in ("weight", "bias"):
            before, after = getattr(old, f"{role}_{which[0]}"), getattr(new, f"{role}_{which[0]}")
            if after is None:
                continue
            if after is not before:
                pname = _fresh(graph, f"{node.name}.{which}.gqa")
                graph.add_param(pname, after.detach().contiguous())
                node.params[which] = pname
            names[f"{role}.{which}"] = node.params[which]
    return names
