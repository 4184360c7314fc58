"""A differentiable forward of a graph, and the bounded distillation ("healing") loop.

The reference executor runs under ``torch.inference_mode``; healing needs gradients.
:class:`TrainableGraph` is the interpreter's gradient policy (the executor's walk and
kernels, so the math is the executor's, not a re-implementation), with chosen parameters
turned into ``nn.Parameter``s.  :func:`heal` distils a student graph towards a teacher graph on
calibration tokens (KL of next-token distributions) and returns the trained tensors,
which the caller writes back into the graph as new parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokopt.optimizer.interpret.interpreter import Interpreter
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import materialize

log = logging.getLogger(__name__)

#: Teacher log-probabilities kept for sequences a run revisits (a 49k vocabulary costs 25 MB per 128 tokens).
TARGET_CACHE_BYTES = 2 << 30


class TrainableGraph(torch.nn.Module):
    """Runs ``graph`` with gradients flowing into the parameters named in ``trainable``."""

    def __init__(self, graph: Graph, trainable: set[str]) -> None:
        super().__init__()
        self.graph = graph
        self._interpreter = Interpreter(graph, self.weight, grad=True)
        self._keys = {name: f"p{i}" for i, name in enumerate(sorted(trainable))}
        self.trained = torch.nn.ParameterDict({
            key: torch.nn.Parameter(materialize(graph.params[name], torch.float32).detach().clone())
            for name, key in self._keys.items()})
        self._frozen: dict[str, torch.Tensor] = {}

    def weight(self, name: str) -> torch.Tensor:
        key = self._keys.get(name)
        if key is not None:
            return self.trained[key]
        w = self._frozen.get(name)
        if w is None:
            w = materialize(self.graph.params[name])
            w = w.float() if w.is_floating_point() else w
            if w.is_inference():  # loaded under an executor's inference_mode: autograd cannot save it
                w = w.clone()
            self._frozen[name] = w
        return w

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._interpreter.run(input_ids)[0]

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.trained[key].detach().clone() for name, key in self._keys.items()}


@dataclass
class HealReport:
    steps: int
    first_kl: float
    last_kl: float
    history: list[float] = field(default_factory=list)
    held_out_first: float | None = None  # KL on the held-out sequences before the first step
    held_out_best: float | None = None  # ... at the kept checkpoint
    best_step: int = 0  # steps taken by the kept checkpoint (0: healing did not help, nothing changed)


def _kl(logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged, from student logits and teacher log-probabilities."""
    logp = F.log_softmax(logits.float(), -1)
    return F.kl_div(logp.flatten(0, 1), target_logp.flatten(0, 1), log_target=True, reduction="batchmean")


def heal(teacher: Graph, student: Graph, trainable: set[str], batches: list[torch.Tensor], steps: int,
         lr: float, seed: int, held_out: Sequence[torch.Tensor] = (), progress=None,
         ) -> tuple[dict[str, torch.Tensor], HealReport]:
    """Distil ``student`` towards ``teacher`` for ``steps`` AdamW steps on ``batches``.

    Returns the kept checkpoint's trained tensors (none when ``best_step`` is 0) and a report.

    The loss is KL(teacher ‖ student) of next-token distributions, averaged over tokens;
    the learning rate warms up for 10 % of the steps, then decays to zero (cosine), and
    gradients are clipped to norm 1 — settings that keep a short run from overshooting.

    With ``held_out`` sequences (never trained on), the KL on them is measured before the
    first step and every tenth of the run, and the best checkpoint is returned: a few
    thousand calibration tokens are easy to overfit, and a run that diverges must not ship
    (on SmolLM2 3→1 at lr 5e-4, no step beat the unhealed model on held-out text).
    """
    from tokopt.optimizer.interpret import ReferenceExecutor

    torch.manual_seed(seed)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    teacher_exec = ReferenceExecutor(teacher)
    targets: dict[int, torch.Tensor] = {}
    model = TrainableGraph(student, trainable)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    held_targets = [F.log_softmax(teacher_exec.forward(ids).float(), -1) for ids in held_out]

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    def held_out_kl() -> float:
        with torch.no_grad():
            return sum(float(_kl(model(ids), t)) for ids, t in zip(held_out, held_targets, strict=True)) / len(held_out)

    first_held = best_held = held_out_kl() if held_out else None
    best: dict[str, torch.Tensor] = {}  # empty while no checkpoint beats the student as given
    best_step = 0
    check_every = max(1, steps // 10)
    history: list[float] = []
    steps_iter = range(steps) if progress is None else progress(range(steps), desc="gqa heal")
    for step in steps_iter:
        b = order[step % len(order)]
        ids = batches[b]
        target = targets.get(b)
        if target is None:
            target = F.log_softmax(teacher_exec.forward(ids).float(), -1)
            if step + len(order) < steps and (len(targets) + 1) * target.nbytes <= TARGET_CACHE_BYTES:
                targets[b] = target  # seen again later in the run
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = _kl(model(ids), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        done = step + 1
        if held_out and (done % check_every == 0 or done == steps):
            kl = held_out_kl()
            log.info("gqa heal step %d/%d: KL %.4f, held-out KL %.4f", done, steps, history[-1], kl)
            if kl < best_held:
                best_held, best, best_step = kl, model.trained_tensors(), done
        elif step % 10 == 0 or done == steps:
            log.info("gqa heal step %d/%d: KL %.4f", done, steps, history[-1])
    if not held_out:
        best, best_step = model.trained_tensors(), steps
    report = HealReport(steps, history[0] if history else 0.0, history[-1] if history else 0.0, history,
                        first_held, best_held, best_step)
    return best, report
