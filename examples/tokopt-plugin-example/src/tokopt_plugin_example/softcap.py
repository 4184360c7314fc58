"""``logit-softcap``: a plugin *op* end to end — its IR spec, torch kernel, ONNX lowering, and the pass inserting it.

``LogitSoftcap`` bounds the logits to ``(-cap, cap)`` with ``cap * tanh(logits / cap)``,
Gemma 2's final logit softcapping (``final_logit_softcapping = 30``): a model trained with
it needs it at inference, and a model trained without it only loses sharpness on its
most confident tokens for large caps.  tokopt has no such op, so this plugin declares
one, with the three things every consumer needs:

- the :class:`~tokopt.optimizer.ir.ops.OpSpec` — verifier, shape inference, cost model;
- :func:`softcap_kernel` — the torch reference kernel, the op's numerical definition that
  the reference executor runs and every backend is checked against;
- :func:`lower_softcap` — the onnxruntime lowering: three standard ONNX nodes.

tokopt imports this module only when the plugin's ops are installed (a plugin pass is
resolved, or a graph naming ``LogitSoftcap`` is read), never when passes are listed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from tokopt.errors import PreconditionError
from tokopt.optimizer.ir.graph import Graph, Node, TensorInfo
from tokopt.optimizer.ir.ops import OpSpec
from tokopt.optimizer.pass_api import Option, Pass, PassContext, PassResult
from tokopt.plugins.ops import OpDefinition

if TYPE_CHECKING:  # the lowering runs only inside the onnxruntime backend, which imports onnx
    from tokopt.backends.onnxruntime.lower import LowerContext

OP = "LogitSoftcap"


def softcap_kernel(node: Node, inputs: list[torch.Tensor], _step: object) -> torch.Tensor:
    """The op's definition: ``cap * tanh(x / cap)``, elementwise."""
    cap = node.attrs["cap"]
    return torch.tanh(inputs[0] / cap) * cap


def lower_softcap(ctx: LowerContext, node: Node, inputs: list[str]) -> str:
    """The same arithmetic in ONNX, node for node (Div, Tanh, Mul), so parity is exact up to rounding."""
    cap = ctx.b.const(node.attrs["cap"], "float32")
    scaled = ctx.b.op("Div", [inputs[0], cap], name=f"{node.name}/div")
    return ctx.b.op("Mul", [ctx.b.op("Tanh", [scaled], name=f"{node.name}/tanh"), cap], name=node.name)


def _same_as_input(node: Node, inputs: list[TensorInfo], graph: Graph) -> list[TensorInfo]:
    return [inputs[0]]


def _flops(node: Node, graph: Graph, _context: int = 0) -> int:
    return 3 * math.prod(node.outputs[0].shape)  # a division, a tanh and a product per element


LOGIT_SOFTCAP = OpDefinition(
    OpSpec(OP, ("x",), ("out",), {"cap": 30.0}, (), _same_as_input, _flops,
           "cap * tanh(x / cap): bounds x to (-cap, cap) (Gemma 2's final logit softcapping)."),
    torch_kernel=softcap_kernel,
    lowerings={"onnxruntime": lower_softcap},
)


class SoftcapLogits(Pass):
    """Softcap the logits: one ``LogitSoftcap`` node between the LM head and the ``logits`` output.

    Changes numerics (the logits move towards zero, the most for the most confident
    tokens); adds 3 FLOPs per vocabulary entry per token and no parameters.  Runs on the
    reference executor and on the onnxruntime backend, which lowers the op with the
    plugin's own lowering.
    """

    name = "logit-softcap"
    summary = "Bound the logits with cap * tanh(logits / cap) (Gemma 2's softcap), through a plugin op"
    options = (
        Option("cap", "float", 30.0, "the bound: every logit stays inside (-cap, cap)",
               check=lambda v: None if v > 0 else "must be positive"),
    )
    moves = ("flops_per_token", "ppl")
    changes_numerics = True

    def check(self, graph: Graph, ctx: PassContext) -> None:
        if graph.producer(graph.outputs["logits"]).op == OP:
            raise PreconditionError(f"{self.name}: the logits are already softcapped")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.check(graph, ctx)
        out = graph.copy()
        cap = self.opts["cap"]
        out.outputs["logits"] = out.add_node(OP, "logit_softcap", [out.outputs["logits"]], {"cap": cap})
        return PassResult(out, modified=True, notes=[f"logits softcapped to (-{cap:g}, {cap:g})"])
