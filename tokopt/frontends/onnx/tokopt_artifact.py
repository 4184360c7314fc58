"""tokopt's own onnxruntime artifacts → IR, exactly: the file carries the graph (``tokopt.graph`` metadata)
and every parameter's storage, so the same nodes, attributes and bit-identical weights come back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokopt.errors import InputFileError, ModelSourceError
from tokopt.frontends.onnx.store import InitializerStore, restore_nbits
from tokopt.optimizer.corpus import has_tokenizer
from tokopt.optimizer.ir.graph import Graph, ModelMeta, Value
from tokopt.optimizer.ir.weights import LazyTensor, experts_from_input


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
        graph.params[pname] = _restore_param(model_path, pname, entry, stored)
    for node in desc["nodes"]:
        inputs = [Value(n, s) for n, s in node["inputs"]]
        graph.add_node(node["op"], node["name"], inputs, node["attrs"], node["params"])
    graph.outputs = {k: Value(n, s) for k, (n, s) in desc["outputs"].items()}
    return graph


def _restore_param(model_path: Path, pname: str, entry: dict[str, Any], stored) -> Any:
    """Invert the storage the onnxruntime backend chose for one parameter.

    The inversion is tried at once on an empty (meta) tensor of the initializer's shape: a lazy
    tensor is read much later, deep in an evaluation, where a damaged description would surface as
    a shape error in tokopt's code instead of naming the file.
    """
    shape = tuple(entry["param_shape"])
    if entry["kind"] == "nbits":
        matrix = restore_nbits(entry, stored)
        if entry.get("layout") == "experts_along_input":  # an MoE down stack laid side by side
            return experts_from_input(matrix, entry["stack"][0])
        return matrix.stacked(shape) if len(shape) > 2 else matrix
    src = stored(entry["init"])
    transform, cols = entry.get("transform", ""), entry.get("cols")

    def fn(t: torch.Tensor) -> torch.Tensor:
        if cols is not None:
            t = t[..., cols[0]:cols[1]]
        if transform == "T":
            t = t.t() if t.dim() == 2 else t.transpose(1, 2)
        elif transform == "stackedT":
            t = t.t().reshape(shape)
        elif transform == "reshape":  # stored with broadcast axes (sink logits, expert biases)
            t = t.reshape(shape)
        elif transform:
            raise ModelSourceError(f"unknown parameter storage transform {transform!r}")
        return t.contiguous()

    try:
        fits = tuple(fn(torch.empty(src.shape, device="meta")).shape) == shape
    except RuntimeError:  # cols or a reshape the initializer cannot give
        fits = False
    if not fits:
        raise InputFileError(f"{model_path}: parameter {pname!r} is described as {shape} but its initializer "
                             f"{entry['init']!r} holds {tuple(src.shape)}; the artifact was changed or damaged since "
                             "tokopt wrote it: re-create it with tokopt optimize")
    return LazyTensor(shape, src.dtype, lambda: fn(src.materialize()))
