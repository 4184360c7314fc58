"""tokopt's own onnxruntime artifacts → IR, exactly: the file carries the graph (``tokopt.graph`` metadata)
and every parameter's storage, so the same nodes, attributes and bit-identical weights come back."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from tokopt.errors import InputFileError, ModelSourceError
from tokopt.frontends.onnx.store import InitializerStore, restore_nbits
from tokopt.optimizer.corpus import has_tokenizer
from tokopt.optimizer.ir.graph import Graph, ModelMeta, Value
from tokopt.optimizer.ir.weights import LazyTensor


def from_tokopt(model, desc: dict[str, Any], model_path: Path) -> Graph:
    if desc.get("format") != 1:
        raise ModelSourceError(f"{model_path}: tokopt graph description format {desc.get('format')!r} is not "
                               "supported by this version (expected 1)")
    store = InitializerStore(model, model_path)
    meta = ModelMeta(**desc["meta"])
    if has_tokenizer(model_path.parent):
        meta.tokenizer_path = str(model_path.parent)
    meta.source = str(model_path)
    graph = Graph(meta)
    graph.history = [*desc["history"], "frontend:onnx:tokopt"]

    def stored(name: str) -> LazyTensor:
        if name not in store.inits:
            raise ModelSourceError(f"{model_path}: initializer {name!r} named by the graph description is missing")
        return store.lazy(name)

    for pname, entry in desc["params"].items():
        graph.params[pname] = _restore_param(entry, stored)
        _check_shape(model_path, pname, entry, graph.params[pname], stored)
    for node in desc["nodes"]:
        inputs = [Value(n, s) for n, s in node["inputs"]]
        graph.add_node(node["op"], node["name"], inputs, node["attrs"], node["params"])
    graph.outputs = {k: Value(n, s) for k, (n, s) in desc["outputs"].items()}
    return graph


def _check_shape(model_path: Path, pname: str, entry: dict[str, Any], param: Any, stored) -> None:
    """The description's shape of ``pname`` must be what its initializer holds once transformed.

    Checked at load, because a lazy tensor is read much later, deep in an evaluation: a damaged
    description would surface there as a shape error in tokopt's code instead of naming the file.
    """
    if entry["kind"] == "nbits":
        return
    src = stored(entry["init"]).shape
    cols, transform = entry.get("cols"), entry.get("transform", "")
    if cols is not None:
        src = (*src[:-1], cols[1] - cols[0])
    if transform == "T":
        src = (src[1], src[0]) if len(src) == 2 else (src[0], src[2], src[1], *src[3:])
    fits = math.prod(src) == math.prod(param.shape) if transform == "stackedT" else tuple(src) == tuple(param.shape)
    if not fits:
        raise InputFileError(f"{model_path}: parameter {pname!r} is described as {tuple(param.shape)} but its "
                             f"initializer {entry['init']!r} holds {tuple(src)}; the artifact was changed or damaged "
                             "since tokopt wrote it: re-create it with tokopt optimize")


def _restore_param(entry: dict[str, Any], stored) -> Any:
    """Invert the storage the onnxruntime backend chose for one parameter."""
    shape = tuple(entry["param_shape"])
    if entry["kind"] == "nbits":
        return restore_nbits(entry, stored)
    src = stored(entry["init"])
    transform, cols = entry.get("transform", ""), entry.get("cols")

    def fn(t: torch.Tensor) -> torch.Tensor:
        if cols is not None:
            t = t[..., cols[0]:cols[1]]
        if transform == "T":
            t = t.t() if t.dim() == 2 else t.transpose(1, 2)
        elif transform == "stackedT":
            t = t.t().reshape(shape)
        elif transform:
            raise ModelSourceError(f"unknown parameter storage transform {transform!r}")
        return t.contiguous()

    return LazyTensor(shape, src.dtype, lambda: fn(src.materialize()))
