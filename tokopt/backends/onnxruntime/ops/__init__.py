"""Per-op lowerings IR → ONNX: built-in ones registered by op name, plugin ones asked for.

A lowering is ``fn(ctx, node, inputs) -> output name(s)`` where ``inputs`` are the ONNX
tensor names of the node's inputs; it appends ONNX nodes through ``ctx.b`` (the
:class:`~tokopt.backends.onnxruntime.onnx_builder.OnnxGraphBuilder`).  Built-in lowerings
register with :func:`register_lowering`.  An op a plugin declares brings its own lowering
in ``OpDefinition.lowerings["onnxruntime"]`` (the contract is in
:mod:`tokopt.plugins.hookspecs`); :func:`get_lowering` falls back to it, run so that a
crash or a malformed answer names the plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tokopt.errors import UnsupportedOpError
from tokopt.plugins import op_lowering, plugin_guard
from tokopt.plugins.ops import op_owner

if TYPE_CHECKING:
    from tokopt.backends.onnxruntime.lower import LowerContext
    from tokopt.optimizer.ir.graph import Node

BACKEND = "onnxruntime"  # the key of this backend's lowerings in a plugin's OpDefinition.lowerings

Lowering = Callable[["LowerContext", "Node", list[str]], Any]
LOWERINGS: dict[str, Lowering] = {}


def register_lowering(op: str) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        LOWERINGS[op] = fn
        return fn
    return deco


def get_lowering(op: str) -> Lowering:
    """The built-in lowering of ``op``, else the one the plugin that declared it provides."""
    _load_builtins()
    lowering = LOWERINGS.get(op) or plugin_lowering(op)
    if lowering is None:
        raise UnsupportedOpError(f"the onnxruntime backend cannot lower this graph: {no_lowering_reason(op)}")
    return lowering


def no_lowering_reason(op: str) -> str | None:
    """Why ``op`` cannot be lowered, or None: what the backends' ``check`` reports before any lowering."""
    _load_builtins()
    if op in LOWERINGS or plugin_lowering(op) is not None:
        return None
    owner = op_owner(op)
    if owner is not None:
        return (f"op {op!r} of plugin {owner!r} has no ONNX lowering (its OpDefinition.lowerings[{BACKEND!r}] "
                "is missing or not callable)")
    return f"op {op!r} has no ONNX lowering (built in: {', '.join(sorted(LOWERINGS))})"


def supported_ops() -> list[str]:
    """The ops with a built-in lowering (a plugin op brings its own)."""
    _load_builtins()
    return sorted(LOWERINGS)


def plugin_lowering(op: str) -> Lowering | None:
    """The plugin lowering of ``op``, guarded: a crash or a wrong answer is a ``PluginError`` naming the plugin."""
    lowering, plugin = op_lowering(BACKEND, op), op_owner(op)
    if not callable(lowering) or plugin is None:
        return None

    def lower(ctx: LowerContext, node: Node, inputs: list[str]) -> list[str]:
        with plugin_guard(plugin, f"the onnxruntime lowering of op {op!r} (node {node.name!r})"):
            outs = lowering(ctx, node, list(inputs))
            names = [outs] if isinstance(outs, str) else list(outs)
            if len(names) != len(node.outputs) or not all(isinstance(n, str) and n for n in names):
                raise TypeError(f"it returned {outs!r}, not {len(node.outputs)} ONNX tensor name(s), one per output")
        return names

    return lower


def _load_builtins() -> None:
    from tokopt.backends.onnxruntime.ops import attention, basic, linear, moe  # noqa: F401
