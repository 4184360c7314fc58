"""Parameter values: dense tensors, lazily loaded tensors and quantized weights.

Weights stay on disk (memory-mapped safetensors) until an executor or a pass touches
them, so ``tokopt inspect`` of a large checkpoint costs no RAM.  A quantized weight is
its own value type holding the packed integers, scales and zero points, so analytic
metrics count the bytes that are really stored and every backend sees the real format.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int4": 0.5,
    "uint4": 0.5, "int64": 8, "int32": 4,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``: the IR names dtypes with plain strings."""
    return str(dtype).removeprefix("torch.")


class LazyTensor:
    """A tensor whose shape and dtype are known but whose data loads on first use.

    ``loader`` is called at most once; derived views (slices, transposes) are new
    ``LazyTensor`` objects whose loader applies the transform to the parent's data.
    """

    def __init__(self, shape: tuple[int, ...], dtype: str, loader: Callable[[], torch.Tensor]):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._loader = loader
        self._value: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        if self._value is None:
            value = self._loader()
            if tuple(value.shape) != self.shape:
                raise ValueError(f"lazy tensor loaded shape {tuple(value.shape)}, expected {self.shape}")
            self._value = value
        return self._value

    def derive(self, shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor]) -> LazyTensor:
        """A lazy view: ``fn`` applied to this tensor's data when first needed."""
        return LazyTensor(shape, self.dtype, lambda: fn(self.materialize()))

    def __repr__(self) -> str:
        state = "loaded" if self._value is not None else "lazy"
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, {state})"


@dataclass
class QuantizedWeight:
    """A ``(out_features, in_features)`` weight — or a stack ``(E, out, in)`` of them (MoE experts) —
    stored as low-bit integers.

    Codes ``q`` are unsigned in ``[0, 2**bits)`` and grouped along the input dimension:
    ``w[o, i] = (q[o, i] - zero[o, g]) * scale[o, g]`` with ``g = i // group_size``.
    For 4 bits two codes share a byte, element ``2j`` in the low nibble (the layout of
    onnxruntime's ``MatMulNBits``).  Symmetric quantization stores no zero points; the
    implied zero is ``2**(bits-1)``.  A stack keeps its rows flattened (``rows`` = E·out):
    every row is quantized on its own, so the stack is E matrices laid one after another.
    """

    packed: torch.Tensor  # uint8, (rows, in * bits / 8)
    scales: torch.Tensor  # float, (rows, n_groups)
    zero_points: torch.Tensor | None  # uint8 (rows, n_groups) or None when symmetric
    bits: int
    group_size: int  # == in_features for per-channel
    shape: tuple[int, ...]  # (out, in) or (E, out, in)
    method: str = "rtn"
    extra: dict = field(default_factory=dict)

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        """Output rows over the whole stack (``E * out`` for experts)."""
        return math.prod(self.shape[:-1])

    @property
    def n_groups(self) -> int:
        return math.ceil(self.in_features / self.group_size)

    @property
    def nbytes(self) -> int:
        total = self.packed.numel() * self.packed.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if self.zero_points is not None:
            total += self.zero_points.numel() * self.zero_points.element_size()
        return total

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes, ``(rows, in)`` int16."""
        return unpack_codes(self.packed, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        if self.zero_points is not None:
            return self.zero_points.to(torch.float32)
        return torch.full_like(self.scales, float(2 ** (self.bits - 1)), dtype=torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        in_f = self.in_features
        q = self.codes().to(torch.float32)
        scale = self.scales.to(torch.float32).repeat_interleave(self.group_size, dim=1)[:, :in_f]
        zero = self.zeros().repeat_interleave(self.group_size, dim=1)[:, :in_f]
        return ((q - zero) * scale).to(dtype).reshape(self.shape)

    def as_matrix(self) -> QuantizedWeight:
        """The same codes as one ``(rows, in)`` matrix (a stack's experts laid one after another)."""
        return replace(self, shape=(self.rows, self.in_features)) if len(self.shape) != 2 else self

    def stacked(self, shape: tuple[int, ...]) -> QuantizedWeight:
        """The inverse of :meth:`as_matrix`: the same rows read as a stack of ``shape``."""
        if math.prod(shape[:-1]) != self.rows or shape[-1] != self.in_features:
            raise ValueError(f"a {self.shape} quantized weight cannot be read as {shape}")
        return replace(self, shape=tuple(shape))


def experts_along_input(w: QuantizedWeight) -> QuantizedWeight:
    """A stack ``(E, out, in)`` laid as one ``(out, E * in)`` matrix: row ``o`` holds expert 0's row ``o``, then
    expert 1's, … — so ``sum_e x_e @ W_e.T`` is one matmul of the experts' inputs laid side by side.  Exact
    (codes and their groups move whole) when ``in`` is a multiple of the group and, for 4 bits, even."""
    e, out_f, in_f = w.shape
    if in_f % w.group_size or (w.bits == 4 and in_f % 2):
        raise ValueError(f"experts of width {in_f} cannot be laid along the input in groups of {w.group_size}")

    def side_by_side(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(e, out_f, -1).transpose(0, 1).reshape(out_f, -1).contiguous()

    return replace(w, packed=side_by_side(w.packed), scales=side_by_side(w.scales),
                   zero_points=side_by_side(w.zero_points), shape=(out_f, e * in_f))


def experts_from_input(w: QuantizedWeight, experts: int) -> QuantizedWeight:
    """The inverse of :func:`experts_along_input`."""
    out_f, width = w.shape

    def stacked(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(out_f, experts, -1).transpose(0, 1).reshape(experts * out_f, -1) \
            .contiguous()

    return replace(w, packed=stacked(w.packed), scales=stacked(w.scales), zero_points=stacked(w.zero_points),
                   shape=(experts, out_f, width // experts))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(out, in)`` integer codes into uint8 bytes along the last dimension."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if bits == 4:
        if codes.shape[-1] % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        low, high = codes[..., 0::2], codes[..., 1::2]
        return (low | (high << 4)).contiguous()
    raise ValueError(f"cannot pack {bits}-bit codes; supported: 4, 8")


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; returns int16 codes of width ``in_features``."""
    if bits == 8:
        return packed.to(torch.int16)
    if bits == 4:
        low = (packed & 0x0F).to(torch.int16)
        high = (packed >> 4).to(torch.int16)
        return torch.stack([low, high], dim=-1).flatten(-2)[..., :in_features]
    raise ValueError(f"cannot unpack {bits}-bit codes; supported: 4, 8")


Weight = torch.Tensor | LazyTensor | QuantizedWeight


def weight_shape(w: Weight) -> tuple[int, ...]:
    return tuple(w.shape)


def weight_numel(w: Weight) -> int:
    return math.prod(weight_shape(w))


def weight_nbytes(w: Weight) -> int:
    """Bytes as stored (packed data + scales + zero points for quantized weights)."""
    if isinstance(w, QuantizedWeight):
        return w.nbytes
    if isinstance(w, LazyTensor):
        return int(math.prod(w.shape) * DTYPE_BYTES[w.dtype])
    return w.numel() * w.element_size()


def weight_dtype(w: Weight) -> str:
    if isinstance(w, QuantizedWeight):
        return f"int{w.bits}"
    if isinstance(w, LazyTensor):
        return w.dtype
    return dtype_name(w.dtype)


class DenseWeights:
    """Dense tensors for a graph's parameters, materialized on first use and kept.

    Every torch executor (reference, compiled, calibration) reads weights through one of
    these, so lazy loading, exact dequantization and the cast to the compute dtype happen
    once per parameter, in one place.  Integer tensors keep their dtype.
    """

    def __init__(self, params: dict[str, Weight], dtype: torch.dtype = torch.float32) -> None:
        self.params = params
        self.dtype = dtype
        self._dense: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        w = self._dense.get(name)
        if w is None:
            w = materialize(self.params[name])
            if w.is_floating_point():
                w = w.to(self.dtype)
            self._dense[name] = w
        return w

    def set(self, name: str, value: Weight) -> None:
        """Replace one parameter's dense value (e.g. after quantizing it mid-calibration)."""
        self._dense[name] = materialize(value, self.dtype)


def materialize(w: Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense tensor for ``w``; quantized weights are dequantized exactly."""
    if isinstance(w, QuantizedWeight):
        t = w.dequantize(dtype or torch.float32)
    elif isinstance(w, LazyTensor):
        t = w.materialize()
    else:
        t = w
    return t.to(dtype) if dtype is not None and t.dtype != dtype else t
