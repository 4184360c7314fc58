"""What a backend can express, typed, and the one check that holds a graph against it.

Every attribute a pass can set has a field here.  :func:`refusals` walks a graph node by node
and names each attribute value the backend cannot honour *for real* — in the artifact it
writes, not only in its numerics (a sliding window computed by masks over a growing cache is
not a bounded cache; int8 weights stored as fp32 are not int8 weights).  The optimize job runs
it on every stage before anything is measured, and in ``--dry-run``; a backend's ``check``
raises :class:`~tokopt.errors.BackendRefusalError` with the first few refusals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tokopt.errors import BackendRefusalError
from tokopt.optimizer.ir.graph import Graph, Node
from tokopt.optimizer.ir.weights import QuantizedWeight


@dataclass(frozen=True)
class Capabilities:
    """What one backend honours.  ``None`` in a tuple-valued field means "any value"."""

    ops: tuple[str, ...] | None = None  # op kinds it can run (None: any op with a reference kernel)
    kv_dtypes: tuple[str, ...] = ("float32",)  # KV cache element types it stores as such
    kv_layouts: tuple[str, ...] = ("BNSH",)
    kv_storages: tuple[str, ...] = ("dynamic",)  # dynamic / static / paged, as the IR defines them
    window: bool = False  # a sliding window with a cache bounded to it
    sinks: bool = False  # attention sinks kept beside the window
    softcap: bool = False
    qk_norm: bool = False
    partial_rotary: bool = False  # rotary_dim < head_dim
    act_quant_bits: tuple[int, ...] = ()  # run-time activation quantization
    act_dtypes: tuple[str, ...] = ()  # Linear inputs and products rounded to a narrower float (act_dtype)
    weight_bits: tuple[int, ...] = ()  # low-bit weights stored as low-bit codes
    weight_group_sizes: tuple[int, ...] | None = None  # quantization groups it stores (None: any)
    weight_per_channel: bool = False  # one group per output row (group_size == in_features)
    weight_asymmetric: bool = False  # zero points
    notes: tuple[str, ...] = ()  # facts for people: fast paths, requirements

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _allowed(value: Any, allowed: tuple | None) -> bool:
    return allowed is None or value in allowed


def _show(values: tuple | None) -> str:
    return "any" if values is None else (", ".join(map(str, values)) or "none")


def _attention(node: Node, caps: Capabilities) -> list[str]:
    a, kv = node.attrs, node.attrs["kv_cache"]
    out = []
    if a.get("window") and not caps.window:
        out.append(f"window={a['window']} (no bounded sliding-window cache)")
    if a.get("sinks") and not caps.sinks:
        out.append(f"sinks={a['sinks']} (no attention sinks)")
    if a.get("softcap") and not caps.softcap:
        out.append(f"softcap={a['softcap']} (no attention-logit soft-capping)")
    if a.get("qk_norm") and not caps.qk_norm:
        out.append("qk_norm (no per-head q/k normalisation)")
    rope = a.get("rope")
    if rope and rope["rotary_dim"] != a["head_dim"] and not caps.partial_rotary:
        out.append(f"rope.rotary_dim={rope['rotary_dim']} < head_dim={a['head_dim']} (no partial rotary)")
    for key, allowed in (("dtype", caps.kv_dtypes), ("layout", caps.kv_layouts), ("storage", caps.kv_storages)):
        value = kv.get(key) or {"layout": "BNSH", "storage": "dynamic"}.get(key)
        if not _allowed(value, allowed):
            out.append(f"kv_cache.{key}={value!r} (supported: {_show(allowed)})")
    return out


def _weight(w: QuantizedWeight, caps: Capabilities) -> list[str]:
    per_channel = w.group_size >= w.in_features
    if w.bits not in caps.weight_bits:
        return [f"int{w.bits} weights (stored natively: {_show(tuple(f'int{b}' for b in caps.weight_bits))})"]
    out = []
    if not _allowed(w.group_size, caps.weight_group_sizes) and not (per_channel and caps.weight_per_channel):
        what = f"per-channel int{w.bits} weights (group {w.group_size} = in_features" if per_channel else \
            f"group_size={w.group_size} ("
        out.append(f"{what}; supported groups: {_show(caps.weight_group_sizes)}"
                   f"{', or per-channel' if caps.weight_per_channel else ''})")
    if not w.symmetric and not caps.weight_asymmetric:
        out.append("asymmetric weights (zero points)")
    return out


def refusals(graph: Graph, caps: Capabilities) -> list[str]:
    """Every ``node: attribute=value (what is supported)`` the backend cannot honour; empty when it can."""
    out = []
    for node in graph.nodes():
        problems = []
        if caps.ops is not None and node.op not in caps.ops:
            problems.append(f"op {node.op!r} (supported: {_show(caps.ops)})")
        if node.op == "Attention":
            problems += _attention(node, caps)
        act = node.attrs.get("act_quant") if node.op == "Linear" else None
        if act and act["bits"] not in caps.act_quant_bits:
            problems.append(f"act_quant bits={act['bits']} (supported: {_show(caps.act_quant_bits)})")
        act_dtype = node.attrs.get("act_dtype") if node.op == "Linear" else None
        if act_dtype and act_dtype not in caps.act_dtypes:
            problems.append(f"act_dtype={act_dtype} (supported: {_show(caps.act_dtypes)})")
        for role, pname in node.params.items():
            w = graph.params[pname]
            if isinstance(w, QuantizedWeight):
                problems += [f"{role} {pname}: {p}" for p in _weight(w, caps)]
        out += [f"{node.name}: {p}" for p in problems]
    return list(dict.fromkeys(out))  # a tensor shared by two nodes is reported once per node


def check_capabilities(graph: Graph, caps: Capabilities, backend: str, more: list[str] | None = None) -> None:
    """Raise :class:`BackendRefusalError` naming the nodes and attributes ``backend`` cannot honour.

    ``more`` adds what only the backend can tell (e.g. why a plugin op has no lowering).
    """
    found = [*(more or []), *refusals(graph, caps)]
    if found:
        shown = "; ".join(found[:3]) + (f" (and {len(found) - 3} more)" if len(found) > 3 else "")
        raise BackendRefusalError(f"the {backend} backend cannot honour this graph: {shown}")


__all__ = ["Capabilities", "refusals", "check_capabilities"]
