"""IR → ONNX: walk the graph in topological order and lower each op into ONNX nodes.

Each IR op has a lowering function (``tokopt.backends.onnxruntime.ops``) that reads its
inputs as ONNX tensor names and returns its outputs' names.  The model's interface is the
one onnxruntime-genai expects of a decoder: ``input_ids``, ``attention_mask``, optional
``position_ids`` and ``past_key_values.{i}.key/value`` in, ``logits`` and
``present.{i}.key/value`` out, so the same file serves tokopt's session and genai.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from tokopt.backends.onnxruntime.onnx_builder import OnnxGraphBuilder
from tokopt.errors import UnsupportedOpError
from tokopt.optimizer.ir.graph import Graph, Node, Value
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize

log = logging.getLogger(__name__)

ATTENTION_MODES = ("auto", "gqa", "decomposed")


@dataclass
class LoweringOptions:
    """How to lower: which fast paths to use.  The defaults are the fastest correct ones.

    ``attention``: ``gqa`` uses ``com.microsoft::GroupQueryAttention`` with a shared
    past/present buffer, ``decomposed`` uses standard ops with a growing cache, ``auto``
    picks GQA when every attention layer fits it.  ``max_length`` bounds the rotary tables
    and the shared KV buffer (default: the model's max positions, ≤ 4096).  MatMulNBits'
    accuracy level is not an option: it follows each Linear's ``act_quant`` in the IR.
    """

    attention: str = "auto"
    fused_norms: bool = True
    max_length: int | None = None
    fuse_qkv: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention, "fused_norms": self.fused_norms,
                "max_length": self.max_length, "fuse_qkv": self.fuse_qkv}


@dataclass
class KVSlot:
    """One attention layer's cache tensors in the model interface."""

    node: str
    index: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # ONNX element type of the cache tensors


@dataclass
class LowerContext:
    graph: Graph
    b: OnnxGraphBuilder
    options: LoweringOptions
    attention_mode: str  # "gqa" or "decomposed", decided once per model
    max_length: int
    values: dict[Value, str] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)  # nodes already lowered by a fusion
    cache: dict[Any, Any] = field(default_factory=dict)  # shared subgraphs (masks, rope tables)
    kv: list[KVSlot] = field(default_factory=list)
    uses_position_ids: bool = False
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # IR param -> how it was stored

    # -- values ---------------------------------------------------------------------
    def inputs(self, node: Node) -> list[str]:
        return [self.values[v] for v in self.graph.inputs_of(node.name)]

    def bind(self, node: str, name: str, slot: int = 0) -> None:
        self.values[Value(node, slot)] = name

    # -- weights --------------------------------------------------------------------
    def raw(self, param: str) -> Any:
        return self.graph.params[param]

    def dense(self, param: str) -> torch.Tensor:
        """The parameter as a dense tensor; a quantized weight has none (it is stored as its codes)."""
        w = self.graph.params[param]
        if isinstance(w, QuantizedWeight):
            raise UnsupportedOpError(f"{param} is quantized: the artifact stores its codes, never a dequantized copy")
        w = materialize(w)
        return w.float() if w.is_floating_point() else w

    def weight_init(self, param: str, transform: str = "", fn: Any = None) -> str:
        """An initializer for ``param`` (optionally transformed, e.g. ``"T"``), created once."""
        key = (param, transform)
        if key not in self.cache:
            tensor = self.dense(param)
            if fn is not None:
                tensor = fn(tensor)
            name = param if not transform else f"{param}.{transform}"
            self.cache[key] = self.b.initializer(name, tensor.contiguous().numpy())
            self.params.setdefault(param, {"kind": "dense", "init": name, "transform": transform})
        return self.cache[key]

    def readers(self, param: str) -> list[Node]:
        """The nodes reading ``param`` (indexed once per lowering: fusion asks for every Linear's)."""
        if "readers" not in self.cache:
            index: dict[str, list[Node]] = {}
            for n in self.graph.nodes():
                for p in dict.fromkeys(n.params.values()):
                    index.setdefault(p, []).append(n)
            self.cache["readers"] = index
        return self.cache["readers"].get(param, [])

    def is_shared(self, param: str) -> bool:
        """Used by more than one node (a tied embedding / lm_head)."""
        return len(self.readers(param)) > 1

    # -- common graph inputs ----------------------------------------------------------
    def position_ids(self) -> str:
        self.uses_position_ids = True
        return "position_ids"

    def shape_dim(self, tensor: str, axis: int) -> str:
        """A 1-D int64 tensor holding ``tensor.shape[axis]`` (cached per tensor and axis)."""
        key = ("dim", tensor, axis)
        if key not in self.cache:
            end = axis + 1 if axis != -1 else None
            self.cache[key] = self.b.op("Shape", [tensor], start=axis, end=end, name="shape")
        return self.cache[key]


def choose_attention_mode(graph: Graph, options: LoweringOptions) -> str:
    from tokopt.backends.onnxruntime.ops.attention import gqa_unsupported_reason

    if options.attention not in ATTENTION_MODES:
        raise UnsupportedOpError(f"unknown attention lowering {options.attention!r}; choose from {ATTENTION_MODES}")
    if options.attention == "decomposed":
        return "decomposed"
    reasons = [r for n in graph.nodes("Attention") if (r := gqa_unsupported_reason(n))]
    if not reasons:
        return "gqa"
    if options.attention == "gqa":
        raise UnsupportedOpError(f"GroupQueryAttention cannot express this model: {reasons[0]}")
    log.info("attention lowered with standard ops: %s", reasons[0])
    return "decomposed"


def default_max_length(graph: Graph, options: LoweringOptions) -> int:
    """The context the artifact serves: at most 4096 tokens by default (a shared KV buffer reserves them
    all), the model's whole context when every layer's cache is a bounded window (only the rotary
    tables grow with it)."""
    static = [int(n.attrs["kv_cache"].get("max_len") or 0) for n in graph.nodes("Attention")
              if n.attrs["kv_cache"].get("storage") == "static" and not n.attrs.get("window")]
    if static and min(static):  # the IR's static cache holds max_len tokens: that is the buffer
        return min([*static, *([int(options.max_length)] if options.max_length else [])])
    if options.max_length:
        return int(options.max_length)
    if all(n.attrs.get("window") for n in graph.nodes("Attention")):
        return int(graph.meta.max_positions or 4096)
    return int(min(graph.meta.max_positions or 4096, 4096))


def kv_storage(graph: Graph) -> str:
    """``static`` when every attention layer's cache is, else ``dynamic``: how the session reserves its
    shared KV buffer (all of ``max_length`` up front, or grown in blocks as tokens arrive)."""
    storages = {n.attrs["kv_cache"].get("storage") or "dynamic" for n in graph.nodes("Attention")}
    return "static" if storages == {"static"} else "dynamic"


def lower_graph(graph: Graph, options: LoweringOptions | None = None) -> LowerContext:
    """Lower ``graph`` into an :class:`OnnxGraphBuilder`; returns the context (builder + interface)."""
    from tokopt.backends.onnxruntime.ops import get_lowering

    options = options or LoweringOptions()
    b = OnnxGraphBuilder(name=graph.meta.architecture or "tokopt")
    ctx = LowerContext(graph, b, options, choose_attention_mode(graph, options), default_max_length(graph, options))
    b.add_input("input_ids", "int64", ["batch_size", "sequence_length"])
    b.add_input("attention_mask", "int64", ["batch_size", "total_sequence_length"])
    for node in graph.nodes():
        if node.name in ctx.done:
            continue
        outs = get_lowering(node.op)(ctx, node, ctx.inputs(node))
        for slot, name in enumerate([outs] if isinstance(outs, str) else outs):
            ctx.bind(node.name, name, slot)
    b.op("Identity", [ctx.values[graph.outputs["logits"]]], outputs=["logits"], name="logits")
    b.add_output("logits", "float32", ["batch_size", "sequence_length", graph.meta.vocab_size])
    if ctx.uses_position_ids:
        b.inputs.insert(2, _position_ids_info())
    past_len = "max_sequence_length" if ctx.attention_mode == "gqa" else "past_sequence_length"
    present_len = "max_sequence_length" if ctx.attention_mode == "gqa" else "total_sequence_length"
    for slot in ctx.kv:
        for kind in ("key", "value"):
            b.add_input(f"past_key_values.{slot.index}.{kind}", slot.dtype,
                        ["batch_size", slot.num_kv_heads, past_len, slot.head_dim])
            b.add_output(f"present.{slot.index}.{kind}", slot.dtype,
                         ["batch_size", slot.num_kv_heads, present_len, slot.head_dim])
    b.metadata["tokopt.lowering"] = json.dumps({**options.to_dict(), "attention_mode": ctx.attention_mode,
                                                "max_length": ctx.max_length, "kv_storage": kv_storage(graph)})
    return ctx


def _position_ids_info():
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
