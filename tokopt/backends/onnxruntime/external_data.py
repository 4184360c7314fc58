"""Write an ONNX model with every weight in one external-data file.

Weights are streamed into ``<model>.data`` one initializer at a time (large ones copied
from the builder's spill file in chunks) and the protobuf only records (location, offset,
length), so models past protobuf's 2 GB limit work and peak memory stays one chunk above
the graph's own.  Large tensors start on 4 KiB
boundaries so onnxruntime can memory-map them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from tokopt.backends.onnxruntime.onnx_builder import NP_TO_ONNX, OnnxGraphBuilder, Spilled

_PAGE = 4096
_SMALL = 1024  # bytes: tiny constants stay inline


def _external_tensor(name: str, array: np.ndarray | Spilled, location: str, offset: int) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = NP_TO_ONNX[array.dtype]
    tensor.dims.extend(array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def write_model(builder: OnnxGraphBuilder, model_path: Path) -> list[str]:
    """Write ``model_path`` and its data file; returns the file names written."""
    data_name = model_path.name + ".data"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    protos: list[TensorProto] = []
    offset = 0
    with open(model_path.parent / data_name, "wb") as data:
        for name, array in builder.initializers.items():
            if isinstance(array, np.ndarray) and array.nbytes <= _SMALL:
                protos.append(onnx.numpy_helper.from_array(array, name))
                continue
            align = _PAGE if array.nbytes >= _PAGE else 64
            pad = (-offset) % align
            if pad:
                data.write(b"\0" * pad)
                offset += pad
            if isinstance(array, Spilled):
                for chunk in builder.spilled_chunks(array):
                    data.write(chunk)
            else:
                data.write(memoryview(array).cast("B"))
            protos.append(_external_tensor(name, array, data_name, offset))
            offset += array.nbytes
    builder.close()
    model = builder.model(protos)
    onnx.save_model(model, str(model_path))
    return [model_path.name, data_name]
