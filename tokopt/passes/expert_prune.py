"""expert-prune: drop the least-used experts of every MoE layer.

Usage is measured on calibration text: for each MoE node, how much routing weight
each expert receives (``method=weight``) or how often it is selected (``method=count``).
The ``keep`` most-used experts stay; their router rows and stacked weights are sliced,
so weight bytes fall while the per-token compute stays that of ``top_k`` experts.
For a model that renormalises its top-k weights (Mixtral), the result is exactly the
original model with the pruned experts masked out of routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer.interpret.kernels import route
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize
from tokopt.optimizer.pass_api import Option, Pass, PassContext, PassResult, in_unit_interval


class ExpertPrunePass(Pass):
    """Remove rarely routed experts from MoE layers, keeping the most used ones."""

    name = "expert-prune"
    summary = "Drop the least-used MoE experts (measured on calibration text)."
    options = (
        Option("keep", "int", None, "Experts to keep per MoE layer (>= top_k). Exclusive with keep_ratio."),
        Option("keep_ratio", "float", None, "Fraction of experts to keep per layer, rounded up.",
               check=in_unit_interval),
        Option("method", "str", "weight", "Usage score: total routing weight (weight) or selection count (count).",
               choices=("weight", "count")),
        Option("layers", "int_list", None, "Layer indices to prune, e.g. 0;2;4-7 (default: every MoE layer)."),
    )
    requires = frozenset({"moe", "calibration"})
    moves = ("params", "weight_bytes", "ppl", "kl")

    def validate(self) -> None:
        if (self.opts["keep"] is None) == (self.opts["keep_ratio"] is None):
            raise PassOptionError("expert-prune: give exactly one of keep=N or keep_ratio=F")
        if self.opts["keep"] is not None and self.opts["keep"] < 1:
            raise PassOptionError("expert-prune: keep must be >= 1")

    def _targets(self, graph: Graph) -> list:
        layers = self.opts["layers"]
        return [n for n in graph.nodes("MoE") if layers is None or _layer_index(n.name) in layers]

    def _keep_count(self, num_experts: int) -> int:
        if self.opts["keep"] is not None:
            return self.opts["keep"]
        return max(1, -(-int(num_experts * self.opts["keep_ratio"] * 1000) // 1000))

    def check(self, graph: Graph, ctx: PassContext) -> None:
        targets = self._targets(graph)
        if not targets:
            kind = ("has no MoE layers" if not graph.nodes("MoE")
                    else f"has no MoE layer among layers {self.opts['layers']}")
            raise PreconditionError(f"expert-prune: the model {kind}; this pass applies to mixture-of-experts models")
        for node in targets:
            if any(isinstance(graph.params[p], QuantizedWeight) for p in node.params.values()):
                raise PreconditionError(
                    f"expert-prune: {node.name} is already quantized; run expert-prune before quantize")
            keep = self._keep_count(node.attrs["num_experts"])
            if not node.attrs["top_k"] <= keep <= node.attrs["num_experts"]:
                raise PreconditionError(
                    f"expert-prune: {node.name} routes each token to top_k={node.attrs['top_k']} of "
                    f"{node.attrs['num_experts']} experts; keep must lie between those")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        targets = self._targets(graph)
        usage = expert_usage(graph, {n.name for n in targets}, ctx, self.opts["method"])
        out = graph.copy()
        notes = []
        for node in targets:
            keep = self._keep_count(node.attrs["num_experts"])
            if keep == node.attrs["num_experts"]:
                continue
            kept = torch.sort(torch.topk(usage[node.name], keep).indices).values
            prune_moe_node(out, node.name, kept)
            share = usage[node.name][kept].sum() / usage[node.name].sum().clamp_min(1e-12)
            notes.append(
                f"{node.name}: kept experts {kept.tolist()} ({100 * share:.1f}% of routing {self.opts['method']})")
        out.reinfer()
        return PassResult(out, modified=bool(notes), notes=notes or ["every MoE layer already has <= keep experts"])


def _layer_index(node_name: str) -> int | None:
    """``layers.7.moe`` -> 7 (frontends name MoE nodes after their decoder layer)."""
    parts = node_name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else None


def expert_usage(graph: Graph, names: set[str], ctx: PassContext, method: str) -> dict[str, torch.Tensor]:
    """Per-expert routing weight (or selection count) summed over the calibration tokens."""
    if not ctx.calibration_batches:
        raise PreconditionError("expert-prune needs calibration text to measure expert usage")
    captured = ctx.capture_inputs(graph, names)
    usage = {}
    for name in names:
        node = graph.node(name)
        router = materialize(graph.params[node.params["router"]]).float()
        bias = node.params.get("router_bias")
        bias = materialize(graph.params[bias]).float() if bias else None
        total = torch.zeros(node.attrs["num_experts"])
        for x in captured[name]:
            weights, chosen = route(F.linear(x.reshape(-1, x.shape[-1]).float(), router, bias), node.attrs)
            score = weights.flatten() if method == "weight" else torch.ones(chosen.numel())
            total.index_add_(0, chosen.flatten(), score)
        usage[name] = total
    return usage


def prune_moe_node(graph: Graph, name: str, kept: torch.Tensor) -> None:
    """Keep only experts ``kept`` in MoE node ``name`` (router rows and bias, stacked weights and biases)."""
    node = graph.node(name)
    for role in ("router", "router_bias", "experts.gate", "experts.up", "experts.down", "experts.gate_bias",
                 "experts.up_bias", "experts.down_bias"):
        pname = node.params.get(role)
        if pname is None:
            continue
        new_name = f"{pname}#experts={len(kept)}"
        graph.params[new_name] = materialize(graph.params[pname])[kept].contiguous()
        node.params[role] = new_name
    node.attrs["num_experts"] = len(kept)
    graph.eliminate_dead_code()
