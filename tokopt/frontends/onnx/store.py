"""An ONNX model's initializers as lazy tensors, and MatMulNBits storage read back as exact QuantizedWeights.

Shared by every ONNX source (tokopt's own artifacts, HF exports, the genai model builder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokopt.errors import InputFileError
from tokopt.optimizer.ir.weights import LazyTensor, QuantizedWeight, pack_codes, unpack_codes


class InitializerStore:
    """A model's initializers, read on demand (external data included); each wrapped once as a LazyTensor."""

    def __init__(self, model, model_path: Path) -> None:
        self.inits = {t.name: t for t in model.graph.initializer}
        self._base = str(model_path.parent)
        self._lazy: dict[str, LazyTensor] = {}

    def load(self, name: str) -> torch.Tensor:
        from onnx import numpy_helper

        return torch.from_numpy(numpy_helper.to_array(self.inits[name], base_dir=self._base).copy())

    def lazy(self, name: str) -> LazyTensor:
        if name not in self._lazy:
            from onnx import helper

            tensor = self.inits[name]
            dtype = str(helper.tensor_dtype_to_np_dtype(tensor.data_type))
            self._lazy[name] = LazyTensor(shape_of(tensor), dtype, lambda: self.load(name))
        return self._lazy[name]


def check_initializers(model, model_path: Path) -> None:
    """Each initializer's bytes exist and match its shape and type (external data: file, bounds, length)."""
    from onnx import TensorProto, helper

    base = model_path.parent.resolve()
    sizes: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise InputFileError(f"{model_path}: initializer {tensor.name!r} has unknown data type {tensor.data_type}; "
                                 "the file is corrupt: re-export it") from None
        count = 1
        for d in tensor.dims:
            count *= int(d)
        packed = tensor.data_type in (TensorProto.INT4, TensorProto.UINT4)
        need = (count + 1) // 2 if packed else count * itemsize
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            where = f"{model_path}: initializer {tensor.name!r}"
            location = info.get("location", "")
            file = (base / location).resolve()
            if not location or not file.is_relative_to(base):
                raise InputFileError(f"{where}: external data location {location!r} is not a file beside the model; "
                                     "the model is corrupt: re-export it")
            if file not in sizes:
                if not file.is_file():
                    raise InputFileError(f"{where}: its external-data file {file} is missing; copy it beside "
                                         f"{model_path.name} (ONNX models with external data are several files)")
                sizes[file] = file.stat().st_size
            try:
                offset, length = int(info.get("offset", 0)), int(info.get("length", need))
            except ValueError:
                raise InputFileError(f"{where}: external data offset/length are not numbers; re-export the "
                                     "model") from None
            if length != need or offset < 0 or offset + length > sizes[file]:
                raise InputFileError(f"{where} needs bytes {offset:,}..{offset + need:,} of {file.name}, which has "
                                     f"{sizes[file]:,}; the file is truncated or does not belong to this model: "
                                     "copy it again")
        elif tensor.HasField("raw_data") and len(tensor.raw_data) != need:
            raise InputFileError(f"{model_path}: initializer {tensor.name!r} holds {len(tensor.raw_data):,} bytes, "
                                 f"its shape needs {need:,}; the file is corrupt: re-export it")


def shape_of(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.dims)


def restore_nbits(entry: dict[str, Any], stored) -> QuantizedWeight:
    n, k = entry["shape"]
    bits, group = entry["bits"], entry["group_size"]
    rows = entry.get("rows") or [0, n]
    sl = slice(rows[0], rows[1])
    k_blocks = -(-k // group)  # groups per row, a trailing partial one padded in the file
    if entry.get("planes"):  # int8 as its two nibble planes (q = 16·hi + lo), each packed two per byte
        hi, lo = (unpack_codes(p, 4, 2 * p.shape[-1]) for p in
                  (stored(plane).materialize()[sl].reshape(n, -1) for plane in entry["planes"]))
        codes = (hi << 4) | lo
    else:
        blob = stored(entry["B"]).materialize()[sl]  # (N, k_blocks, blob)
        flat = blob.reshape(n, -1)
        codes = unpack_codes(flat, 4, 2 * flat.shape[-1]) if bits == 4 else flat
    codes = codes.reshape(n, k_blocks * group)[:, :k]
    scale_dtype = getattr(torch, entry.get("scale_dtype", "float32"))
    scales = stored(entry["scales"]).materialize()[sl].reshape(n, k_blocks).to(scale_dtype)
    zeros = None
    if entry.get("zero_points"):
        z = stored(entry["zero_points"]).materialize()[sl]
        zeros = unpack_codes(z.reshape(n, -1), 4, k_blocks) if bits == 4 else z
        zeros = zeros.reshape(n, k_blocks).to(torch.uint8).contiguous()
    return QuantizedWeight(pack_codes(codes, bits), scales.contiguous(), zeros, bits, group, (n, k),
                           entry.get("method", "rtn"), dict(entry.get("extra") or {}))
