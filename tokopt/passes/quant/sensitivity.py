"""How much each weight tensor's quantization costs the model: an estimated KL per tensor and format.

Measuring the KL of quantizing each Linear *alone* by running the model once per Linear is
~200 forwards for SmolLM2 — minutes the quantize stage cannot spend.  The second-order
estimate needs one backward per calibration sequence instead:

    KL(p ‖ p_q) ≈ ½ δθᵀ F δθ,   F = E_{y~p}[∇ log p(y) ∇ log p(y)ᵀ]   (the model's Fisher)

Labels are *sampled from the model itself* (the true Fisher, not the empirical one), and the
weight perturbation enters through the Linear's output: ``δy = X ΔWᵀ`` with ``g = ∂ log p/∂y``,
so ``½ Σ_{t,j} g_{tj}² δy_{tj}²`` (diagonal over tokens and channels) estimates the KL per token
of quantizing that tensor alone.  A tensor read by several nodes (a tied embedding and
``lm_head``) sums its readers.  ``benchmarks/bench_quantize_mixed.py`` checks the estimate
against the measured KL-alone of a sample of tensors (rank correlation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokopt.optimizer.interpret.interpreter import Interpreter
from tokopt.optimizer.ir.graph import Graph, Value
from tokopt.passes.attention.trainable import TrainableGraph

log = logging.getLogger(__name__)

#: A candidate format's dequantized weight, from the float one.
Quantizer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Reader:
    """One node reading a parameter: a Linear (``y = x Wᵀ``) or an Embedding (``y = W[ids]``)."""

    node: str
    op: str


def readers_of(graph: Graph, params: Sequence[str]) -> dict[str, list[Reader]]:
    """Linear/Embedding nodes reading each of ``params`` as their ``weight``."""
    wanted = set(params)
    found: dict[str, list[Reader]] = {p: [] for p in params}
    for node in graph.nodes():
        p = node.params.get("weight")
        if p in wanted and node.op in ("Linear", "Embedding"):
            found[p].append(Reader(node.name, node.op))
    return found


def estimate_kl(graph: Graph, batches: Sequence[torch.Tensor], formats: dict[str, dict[str, Quantizer]],
                seed: int = 0, progress: Callable = lambda it, **_: it) -> dict[str, dict[str, float]]:
    """Estimated KL per token of quantizing each parameter alone, for each candidate format.

    ``formats`` maps a parameter name to ``{format label: quantizer}``; the result maps the same
    names and labels to the estimate (nats per token).  Runs each batch forward and backward once.
    """
    params = list(formats)
    readers = readers_of(graph, params)
    # the token embedding as a trainable leaf makes every activation after it track a gradient
    grad_leaf = next(n.params["weight"] for n in graph.nodes("Embedding"))
    weights = TrainableGraph(graph, {grad_leaf}).weight
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    for p in params:
        w = weights(p).detach()
        deltas[p] = {label: (quant(w) - w).contiguous() for label, quant in formats[p].items()}
    totals = {p: dict.fromkeys(formats[p], 0.0) for p in params}
    tokens = 0
    gen = torch.Generator().manual_seed(seed)
    interpreter = Interpreter(graph, weights, grad=True, exact=False)  # fused kernels: a statistic, not parity
    for batch in progress(batches, desc="sensitivity"):
        batch = batch if batch.dim() == 2 else batch.unsqueeze(0)
        lane = interpreter.lane(batch)
        interpreter.walk([lane])
        outs = {r.node: lane.values[Value(r.node, 0)] for p in params for r in readers[p]}
        for y in outs.values():
            y.retain_grad()
        logits = lane.values[interpreter.logits].float()
        with torch.no_grad():
            labels = torch.multinomial(F.softmax(logits.flatten(0, 1), -1), 1, generator=gen).squeeze(-1)
        F.cross_entropy(logits.flatten(0, 1), labels, reduction="sum").backward()
        with torch.no_grad():
            for p in params:
                for r in readers[p]:
                    g2 = outs[r.node].grad.float().flatten(0, -2).pow(2)
                    if r.op == "Linear":
                        x = lane.values[interpreter.inputs[r.node][0]].float().flatten(0, -2)
                        for label, d in deltas[p].items():
                            totals[p][label] += 0.5 * float((g2 * (x @ d.T).pow(2)).sum())
                    else:
                        ids = batch.reshape(-1)
                        for label, d in deltas[p].items():
                            totals[p][label] += 0.5 * float((g2 * d[ids].pow(2)).sum())
        tokens += batch.numel()
        del lane, outs, logits
    return {p: {label: v / max(tokens, 1) for label, v in per.items()} for p, per in totals.items()}
