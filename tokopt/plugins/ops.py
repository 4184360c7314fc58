"""How a plugin declares a new IR op: its spec, its torch reference kernel, its lowerings.

An op is useful only when every consumer understands it: the verifier and cost model
(through the :class:`~tokopt.optimizer.ir.ops.OpSpec`), the reference executor (through a
torch kernel — the op's numerical definition, which every backend is checked against)
and each backend that should run it (through a backend-specific *lowering*).  Bundling
the three in one :class:`OpDefinition` keeps them from drifting apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokopt.optimizer.ir.ops import OpSpec


@dataclass(frozen=True)
class OpDefinition:
    """One op kind contributed by a plugin.

    ``torch_kernel`` has the signature of the kernels in
    :mod:`tokopt.optimizer.interpret.kernels`: ``(node, inputs, step_context) -> tensor``.
    ``lowerings`` maps a backend name to whatever that backend documents as an op lowering
    (the ``"onnxruntime"`` one — a function emitting ONNX nodes — is specified in
    :mod:`tokopt.plugins.hookspecs`); backends fetch it with :func:`tokopt.plugins.op_lowering`.
    """

    spec: OpSpec
    torch_kernel: Callable[..., Any] | None = None
    lowerings: dict[str, Any] = field(default_factory=dict)


_LOWERINGS: dict[tuple[str, str], Any] = {}  # (backend, op) -> lowering
_OWNERS: dict[str, str] = {}  # op name -> plugin that declared it


def install_op(definition: OpDefinition, plugin: str) -> None:
    """Make ``definition`` known to the IR, the reference executor and the backends."""
    from tokopt.errors import PluginError
    from tokopt.optimizer.interpret.kernels import KERNELS
    from tokopt.optimizer.ir.ops import all_ops, register_op

    name = definition.spec.name
    if _OWNERS.get(name) == plugin:
        return
    if name in all_ops():
        owner = _OWNERS.get(name, "tokopt")
        raise PluginError(f"plugin {plugin!r} declares op {name!r}, which {owner!r} already declares")
    register_op(definition.spec)
    if definition.torch_kernel is not None:
        KERNELS[name] = definition.torch_kernel
    for backend, lowering in definition.lowerings.items():
        _LOWERINGS[(backend, name)] = lowering
    _OWNERS[name] = plugin


def op_lowering(backend: str, op: str) -> Any | None:
    """The lowering a plugin registered for ``op`` on ``backend``, or None."""
    return _LOWERINGS.get((backend, op))


def op_owner(op: str) -> str | None:
    """The plugin that declared ``op`` (None for built-in ops)."""
    return _OWNERS.get(op)
