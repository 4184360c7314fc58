"""Save and load a :class:`Graph` exactly: ``graph.json`` + ``weights.safetensors``.

The JSON holds the structure (nodes in insertion order with op, attrs, parameter roles
and output types; edges with their slots; outputs; metadata; history) and the
safetensors file holds every parameter tensor.  A :class:`QuantizedWeight` is stored as
its own packed codes, scales and zero points plus its metadata — never dequantized — so
``load_graph(save_graph(g))`` has the same bytes, the same analytic metrics and the same
logits as ``g``.  Tuples and tensors inside attributes are tagged so they come back as
tuples and tensors.  Loading is lazy: tensors are memory-mapped reads on first use.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokopt.errors import ModelSourceError
from tokopt.optimizer.ir.graph import Graph, ModelMeta, Node, TensorInfo, Value
from tokopt.optimizer.ir.ops import ensure_ops
from tokopt.optimizer.ir.weights import LazyTensor, QuantizedWeight, dtype_name, materialize

GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"
GRAPH_FORMAT_VERSION = 1

_QUANT_PARTS = ("packed", "scales", "zero_points")


class _Encoder:
    """JSON-encodes attribute values, moving tensors into the safetensors file."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __call__(self, value: Any, where: str) -> Any:
        if isinstance(value, bool | int | str) or value is None:
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, tuple):
            return {"__tuple__": [self(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"{where}: dictionary keys must be strings to serialize, got {list(value)}")
            return {k: self(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, torch.Tensor):
            key = f"__attr__/{where}"
            self.tensors[key] = value.detach().contiguous().clone()
            return {"__tensor__": key}
        raise TypeError(f"{where}: cannot serialize a {type(value).__name__} attribute")


def _decode(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value and len(value) == 1:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__float__" in value and len(value) == 1:
            return float(value["__float__"])
        if "__tensor__" in value and len(value) == 1:
            return tensors[value["__tensor__"]]
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _dedupe(tensor: torch.Tensor, seen: dict[tuple[int, int], str], key: str) -> torch.Tensor:
    """safetensors refuses tensors sharing memory; clone those (ties are by name, not storage)."""
    tensor = tensor.detach().contiguous()
    ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
    if tensor.numel() and ident in seen:
        tensor = tensor.clone()
    seen[ident] = key
    return tensor


def graph_to_json(graph: Graph, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The JSON document for ``graph``; fills ``tensors`` with everything that goes to safetensors."""
    encode = _Encoder(tensors)
    seen: dict[tuple[int, int], str] = {}
    params: dict[str, Any] = {}
    for name, w in graph.params.items():
        if isinstance(w, QuantizedWeight):
            entry: dict[str, Any] = {"kind": "quantized", "bits": w.bits, "group_size": w.group_size,
                                     "shape": list(w.shape), "method": w.method,
                                     "extra": encode(w.extra, f"params.{name}.extra"), "tensors": {}}
            for part in _QUANT_PARTS:
                t = getattr(w, part)
                if t is not None:
                    key = f"{name}#{part}"
                    tensors[key] = _dedupe(t, seen, key)
                    entry["tensors"][part] = key
            params[name] = entry
        else:
            t = materialize(w)
            tensors[name] = _dedupe(t, seen, name)
            params[name] = {"kind": "dense", "dtype": dtype_name(t.dtype), "shape": list(t.shape), "tensor": name}
    nodes = []
    for name in graph.nx.nodes:  # insertion order: it breaks topological ties, so keep it
        n = graph.node(name)
        nodes.append({"name": n.name, "op": n.op, "attrs": encode(n.attrs, f"nodes.{name}.attrs"),
                      "params": dict(n.params),
                      "outputs": [{"shape": list(o.shape), "dtype": o.dtype} for o in n.outputs]})
    edges = [{"src": s, "dst": d, "src_slot": data["src_slot"], "dst_slot": data["dst_slot"]}
             for s, d, data in graph.nx.edges(data=True)]
    return {
        "format_version": GRAPH_FORMAT_VERSION,
        "meta": encode(asdict(graph.meta), "meta"),
        "nodes": nodes,
        "edges": edges,
        "outputs": {k: [v.node, v.slot] for k, v in graph.outputs.items()},
        "params": params,
        "history": list(graph.history),
    }


def save_graph(graph: Graph, directory: Path) -> list[str]:
    """Write ``graph.json`` and ``weights.safetensors`` into ``directory``; returns the file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    doc = graph_to_json(graph, tensors)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "tokopt": "graph-weights"})
    _sort_safetensors_metadata(directory / WEIGHTS_FILE)
    (directory / GRAPH_FILE).write_text(json.dumps(doc, indent=1, allow_nan=False))
    return [GRAPH_FILE, WEIGHTS_FILE]


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the ``__metadata__`` of the safetensors file at ``path`` in sorted key order, in place.

    safetensors (Rust) keeps the metadata in a ``HashMap`` seeded at random per process, so the
    same graph saved twice came out with ``{"format", "tokopt"}`` in either order — artifacts of
    identical inputs differed in their header bytes.  The header is re-encoded as compactly as
    safetensors writes it, padded to its old length (the data offsets are relative to its end, so
    nothing else moves); should the encoding ever differ in length, the file is left as it is.
    """
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(size)
        header = json.loads(raw)
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(encoded) != len(raw.rstrip(b" ")):
            return
        f.seek(8)
        f.write(encoded.ljust(size, b" "))


def _reader(path: Path) -> tuple[dict[str, LazyTensor], Any]:
    def load(key: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    lazy: dict[str, LazyTensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
                     "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F64": "float64"
                     }.get(sl.get_dtype(), sl.get_dtype().lower())
            lazy[key] = LazyTensor(tuple(sl.get_shape()), dtype, lambda k=key: load(k))
    return lazy, load


def load_graph(directory: Path) -> Graph:
    """Read a graph written by :func:`save_graph` (parameters load lazily)."""
    directory = Path(directory)
    gpath, wpath = directory / GRAPH_FILE, directory / WEIGHTS_FILE
    if not gpath.exists() or not wpath.exists():
        raise ModelSourceError(f"{directory} holds no serialized tokopt graph ({GRAPH_FILE} + {WEIGHTS_FILE})")
    doc = json.loads(gpath.read_text())
    if doc.get("format_version") != GRAPH_FORMAT_VERSION:
        raise ModelSourceError(f"{gpath}: graph format version {doc.get('format_version')!r} is not supported "
                               f"(this tokopt reads version {GRAPH_FORMAT_VERSION})")
    lazy, load = _reader(wpath)
    attr_tensors = _AttrTensors(lazy)
    ensure_ops({n["op"] for n in doc["nodes"]})  # a graph from a plugin pass may use plugin ops
    meta_fields = {f.name for f in fields(ModelMeta)}
    meta = ModelMeta(**{k: v for k, v in _decode(doc["meta"], attr_tensors).items() if k in meta_fields})
    graph = Graph(meta)
    for n in doc["nodes"]:
        node = Node(n["name"], n["op"], _decode(n["attrs"], attr_tensors), dict(n["params"]),
                    [TensorInfo(tuple(o["shape"]), o["dtype"]) for o in n["outputs"]])
        graph.nx.add_node(node.name, node=node)
    for e in doc["edges"]:
        graph.nx.add_edge(e["src"], e["dst"], src_slot=e["src_slot"], dst_slot=e["dst_slot"])
    graph.outputs = {k: Value(v[0], v[1]) for k, v in doc["outputs"].items()}
    for name, p in doc["params"].items():
        if p["kind"] == "quantized":
            parts = {part: load(key) for part, key in p["tensors"].items()}
            graph.params[name] = QuantizedWeight(
                packed=parts["packed"], scales=parts["scales"], zero_points=parts.get("zero_points"),
                bits=p["bits"], group_size=p["group_size"], shape=tuple(p["shape"]), method=p["method"],
                extra=_decode(p["extra"], attr_tensors))
        else:
            graph.params[name] = lazy[p["tensor"]]
    graph.history = list(doc["history"])
    return graph


class _AttrTensors(dict):
    """Attribute tensors are materialized when decoded (they are small)."""

    def __init__(self, lazy: dict[str, LazyTensor]) -> None:
        super().__init__()
        self._lazy = lazy

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._lazy[key].materialize()


__all__ = ["GRAPH_FILE", "WEIGHTS_FILE", "GRAPH_FORMAT_VERSION", "save_graph", "load_graph", "graph_to_json"]
