"""One attention block (q/k/v projections → Attention → o_proj) run with the reference kernels.

The gqa pass scores a candidate merge by the relative error of this block's output on
calibration inputs; running the executor's own kernels keeps that score faithful to what
the converted model will compute (RoPE, qk-norm, masks, softcap included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokopt.optimizer.interpret.kernels import StepContext, get_kernel
from tokopt.optimizer.ir.graph import Node
from tokopt.passes.attention.merge import AttentionWeights


def block_output(node: Node, attrs: dict, w: AttentionWeights, x: torch.Tensor,
                 norms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """o_proj(attention(q(x), k(x), v(x))) for ``x`` of shape (batch, seq, hidden)."""
    q = F.linear(x, w.q_w, w.q_b)
    k = F.linear(x, w.k_w, w.k_b)
    v = F.linear(x, w.v_w, w.v_b)
    probe = Node(node.name, "Attention", attrs, {r: r for r in (norms or {})})
    weights = dict(norms or {})
    ctx = StepContext(weights.__getitem__, torch.arange(x.shape[1]), torch.zeros(x.shape[:2], dtype=torch.long), None)
    out = get_kernel("Attention")(probe, [q, k, v], ctx)
    return F.linear(out, w.o_w, w.o_b)


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """‖candidate - reference‖² / ‖reference‖² over every element."""
    return float((candidate - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))
