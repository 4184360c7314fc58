"""A small accumulator for ONNX nodes and initializers, on top of ``onnx.helper``.

Lowering code asks for ``op("MatMul", [a, b])`` and gets a fresh tensor name back.
Small initializers stay numpy arrays until the model is written; a large one is spilled
to an unnamed temporary file the moment it is made, so lowering holds one weight's copy
at a time however large the model (a 7B model's int4 codes would otherwise sit in RAM
twice: in the graph and in the builder), and the writer streams the spill into the
external-data file without ever holding a >2 GB protobuf in memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import onnx
from onnx import TensorProto, helper

MS_DOMAIN = "com.microsoft"
OPSET = 21  # default-domain opset: Gelu (20), LayerNormalization (17) and friends
IR_VERSION = 10  # onnxruntime 1.31 rejects IR version 14; 10 is what opset 21 needs

NP_TO_ONNX = {
    np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64, np.dtype("int32"): TensorProto.INT32,
    np.dtype("uint8"): TensorProto.UINT8, np.dtype("int8"): TensorProto.INT8, np.dtype("bool"): TensorProto.BOOL,
}
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
               "int32": TensorProto.INT32, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8}


SPILL_BYTES = 1 << 20  # initializers at least this large go to the spill file


@dataclass(frozen=True)
class Spilled:
    """An initializer's bytes in the builder's spill file."""

    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]


class OnnxGraphBuilder:
    """Nodes, initializers, graph inputs/outputs and metadata of one model under construction."""

    def __init__(self, name: str = "tokopt") -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray | Spilled] = {}
        self._spill: IO[bytes] | None = None
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.metadata: dict[str, str] = {}
        self._counter = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    # -- tensors ------------------------------------------------------------------------
    def initializer(self, name: str, array: np.ndarray) -> str:
        """Register a weight under ``name`` (names are kept: they map back to IR parameters)."""
        if name in self.initializers:
            raise ValueError(f"duplicate initializer {name!r}")
        array = np.ascontiguousarray(array)
        if array.nbytes < SPILL_BYTES:
            self.initializers[name] = array
            return name
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(prefix="tokopt-onnx-")  # unnamed: nothing to clean up
        offset = self._spill.seek(0, 2)
        self._spill.write(memoryview(array).cast("B"))
        self.initializers[name] = Spilled(offset, array.nbytes, array.dtype, tuple(array.shape))
        return name

    def spilled_chunks(self, entry: Spilled, chunk: int = 64 << 20) -> Iterator[bytes]:
        """A spilled initializer's bytes, read back in chunks."""
        assert self._spill is not None
        self._spill.seek(entry.offset)
        left = entry.nbytes
        while left:
            data = self._spill.read(min(chunk, left))
            left -= len(data)
            yield data

    def close(self) -> None:
        """Drop the spill file (the model has been written)."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def const(self, value: Any, dtype: str = "int64") -> str:
        """A small constant, deduplicated: ``const([0, 0, -1])`` for reshape targets and the like."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(self.fresh("const"), array)
        return self._consts[key]

    def add_input(self, name: str, dtype: str, shape: Sequence[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[dtype], list(shape)))
        return name

    def add_output(self, name: str, dtype: str, shape: Sequence[int | str | None]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, ONNX_DTYPES[dtype], list(shape)))
        return name

    # -- nodes --------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], *, outputs: int | Sequence[str] = 1, domain: str = "",
           name: str | None = None, **attrs: Any) -> Any:
        """Append one node; returns its output name (or the list of names for several outputs)."""
        hint = name or op_type
        outs = [self.fresh(f"{hint}/out{i}") for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(hint), domain=domain or None,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def ms(self, op_type: str, inputs: Sequence[str], **kwargs: Any) -> Any:
        """A ``com.microsoft`` contrib op."""
        return self.op(op_type, inputs, domain=MS_DOMAIN, **kwargs)

    # -- finishing ----------------------------------------------------------------------
    def model(self, initializer_protos: list[onnx.TensorProto]) -> onnx.ModelProto:
        """The ModelProto, with ``initializer_protos`` (already external or embedded) as weights."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer_protos)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="tokopt")
        model.ir_version = IR_VERSION
        for key, value in self.metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        return model
