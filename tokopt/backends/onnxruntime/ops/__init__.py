"""Per-op lowerings IR → ONNX, registered by op name.

A lowering is ``fn(ctx, node, inputs) -> output name(s)`` where ``inputs`` are the ONNX
tensor names of the node's inputs.  Plugins that declare a new IR op register its
lowering with :func:`register_lowering`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tokopt.errors import UnsupportedOpError

if TYPE_CHECKING:
    from tokopt.backends.onnxruntime.lower import LowerContext
    from tokopt.optimizer.ir.graph import Node

Lowering = Callable[["LowerContext", "Node", list[str]], Any]
LOWERINGS: dict[str, Lowering] = {}


def register_lowering(op: str) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        LOWERINGS[op] = fn
        return fn
    return deco


def get_lowering(op: str) -> Lowering:
    _load_builtins()
    try:
        return LOWERINGS[op]
    except KeyError:
        raise UnsupportedOpError(
            f"the onnxruntime backend cannot lower op {op!r}; supported: {', '.join(sorted(LOWERINGS))}") from None


def supported_ops() -> list[str]:
    _load_builtins()
    return sorted(LOWERINGS)


def _load_builtins() -> None:
    from tokopt.backends.onnxruntime.ops import attention, basic, linear, moe  # noqa: F401
