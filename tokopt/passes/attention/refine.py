"""Block-local refinement of a KV-head merge: gradient steps on one attention block at a time.

The closed-form merge (:mod:`tokopt.passes.attention.merge`) fits keys and values
linearly; the block's real output passes them through RoPE and a softmax.  Refinement
trains the converted block's q/k/v/o projections so that, on the *teacher's* inputs to
that layer (captured once on calibration text), its output matches the unconverted
block's — the loss is the relative squared error that ``max_error`` measures.  One block
forward/backward is ~1/30 of a SmolLM2 step of end-to-end healing, so hundreds of steps
per layer cost what a few dozen model-level steps do; healing then starts from a model
whose layers are each already close to the teacher's.
"""

from __future__ import annotations

import dataclasses

import torch

from tokopt.optimizer.ir.graph import Node
from tokopt.passes.attention.block import block_output
from tokopt.passes.attention.merge import AttentionWeights


def refine_block(node: Node, teacher_attrs: dict, student_attrs: dict, teacher: AttentionWeights,
                 merged: AttentionWeights, x: torch.Tensor, norms: dict[str, torch.Tensor], *, steps: int,
                 lr: float, seq_len: int, batch: int = 2, seed: int = 0) -> tuple[AttentionWeights, float, float]:
    """Adam steps on ``merged`` towards ``teacher``'s block output; returns (weights, first error, last error).

    ``x`` is (1, tokens, hidden): calibration sequences of ``seq_len`` tokens laid end to
    end; each step takes ``batch`` of them (positions restart per sequence, as at capture).
    """
    # clones: captured tensors may come from an inference-mode run, which autograd cannot save
    seqs = x[0, : x.shape[1] // seq_len * seq_len].float().clone().reshape(-1, seq_len, x.shape[-1])
    norms = {role: t.clone() for role, t in norms.items()}
    with torch.no_grad():
        targets = torch.cat([block_output(node, teacher_attrs, teacher, s[None], norms) for s in seqs])
    fields = [f.name for f in dataclasses.fields(AttentionWeights)]
    params = {name: torch.nn.Parameter(getattr(merged, name).detach().clone())
              for name in fields if getattr(merged, name) is not None}
    opt = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    first = last = 0.0
    for step in range(steps):
        pick = torch.randperm(len(seqs), generator=gen)[:batch]
        current = AttentionWeights(**{name: params.get(name) for name in fields})
        out = block_output(node, student_attrs, current, seqs[pick], norms)
        ref = targets[pick]
        loss = (out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
        if step == 0:
            first = last
    refined = AttentionWeights(**{name: (params[name].detach() if name in params else None) for name in fields})
    return refined, first, last
