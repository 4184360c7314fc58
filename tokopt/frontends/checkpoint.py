"""Lazy access to a Hugging Face checkpoint's tensors.

safetensors files are opened memory-mapped and each tensor becomes a
:class:`~tokopt.optimizer.ir.weights.LazyTensor`; nothing is read until used.  Legacy
``pytorch_model*.bin`` files load with ``weights_only=True`` (no pickled code runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tokopt.errors import InputFileError, ModelSourceError
from tokopt.io_boundary import reading
from tokopt.optimizer.ir.weights import LazyTensor, dtype_name

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
              "I8": "int8", "U8": "uint8", "BOOL": "bool", "F64": "float64"}


def _safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        with reading(index, "safetensors index"):
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise InputFileError(f"{index} names shard(s) that are not there: {', '.join(missing[:4])}; "
                                 "download the complete checkpoint")
        return [model_dir / s for s in shards]
    return sorted(model_dir.glob("*.safetensors"))


def _load_safetensor(path: Path, key: str) -> torch.Tensor:
    with reading(path, "safetensors checkpoint"), safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def read_checkpoint(model_dir: Path) -> dict[str, LazyTensor]:
    """All tensors of the checkpoint in ``model_dir``, by their checkpoint names.

    Opening a safetensors file validates its whole header against the file's size (a truncated or
    corrupt file fails here, naming itself, not later inside a pass).
    """
    tensors: dict[str, LazyTensor] = {}
    files = _safetensor_files(model_dir)
    for path in files:
        with reading(path, "safetensors checkpoint"), safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
                tensors[key] = LazyTensor(tuple(sl.get_shape()), dtype,
                                          lambda p=path, k=key: _load_safetensor(p, k))
    if files:
        return tensors
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelSourceError(f"{model_dir} has no *.safetensors or pytorch_model*.bin weights")
    for path in bins:
        with reading(path, "PyTorch checkpoint"):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict):
            raise InputFileError(f"{path} does not hold a state dict of tensors; re-save the checkpoint")
        for key, value in state.items():
            tensors[key] = LazyTensor(tuple(value.shape), dtype_name(value.dtype), lambda v=value: v)
    return tensors
