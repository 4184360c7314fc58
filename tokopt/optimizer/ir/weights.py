"""Parameter values: dense tensors, lazily loaded tensors and quantized weights.

Weights stay on disk (memory-mapped safetensors) until an executor or a pass touches
them, so ``tokopt inspect`` of a large checkpoint costs no RAM, and a lazy tensor never
keeps what it loaded: whoever reads it decides what stays in memory (:class:`DenseWeights`
keeps a small model's weights, and only the few in use of a model past the memory budget).  A quantized weight is
its own value type holding the packed integers, scales and zero points, so analytic
metrics count the bytes that are really stored and every backend sees the real format.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from tokopt.errors import UsageError

DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int4": 0.5,
    "uint4": 0.5, "int64": 8, "int32": 4,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``: the IR names dtypes with plain strings."""
    return str(dtype).removeprefix("torch.")


class LazyTensor:
    """A tensor whose shape and dtype are known but whose data loads when asked for.

    ``loader`` runs on every :meth:`materialize` and the result is not kept here: a lazy
    tensor is a recipe, so a model larger than RAM can be read one tensor at a time.
    Derived views (slices, transposes) are new ``LazyTensor`` objects whose loader applies
    the transform to the parent's data.
    """

    def __init__(self, shape: tuple[int, ...], dtype: str, loader: Callable[[], torch.Tensor]):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._loader = loader

    def materialize(self) -> torch.Tensor:
        value = self._loader()
        if tuple(value.shape) != self.shape:
            raise ValueError(f"lazy tensor loaded shape {tuple(value.shape)}, expected {self.shape}")
        return value

    def derive(self, shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor]) -> LazyTensor:
        """A lazy view: ``fn`` applied to this tensor's data when first needed."""
        return LazyTensor(shape, self.dtype, lambda: fn(self.materialize()))

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


DEQUANT_SLAB = 1 << 22  # elements dequantized at a time (16 MB of float32)


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
        zero_points = self.zero_points
        if zero_points is not None:
            return zero_points.to(torch.float32)
        return torch.full((self.rows, self.n_groups), float(2 ** (self.bits - 1)), dtype=torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight, ``(q - zero) * scale`` per group, filled a slab of rows at a time so the only
        full-size tensor is the result (a 7B model's embedding would otherwise need five of them)."""
        rows, in_f, g = self.rows, self.in_features, self.group_size
        groups = self.n_groups
        out = torch.empty(rows, in_f, dtype=dtype)
        packed, scales, zeros = self.packed, self.scales.to(torch.float32), self.zeros()  # each read once
        step = max(1, DEQUANT_SLAB // max(in_f, 1))
        for r in range(0, rows, step):
            q = unpack_codes(packed[r:r + step], self.bits, in_f).to(torch.float32)
            if groups * g != in_f:
                q = torch.nn.functional.pad(q, (0, groups * g - in_f))
            q = q.view(-1, groups, g).sub_(zeros[r:r + step, :, None]).mul_(scales[r:r + step, :, None])
            out[r:r + step] = q.view(-1, groups * g)[:, :in_f]
        return out.reshape(self.shape)

    def as_matrix(self) -> QuantizedWeight:
        """The same codes as one ``(rows, in)`` matrix (a stack's experts laid one after another)."""
        return self.reshaped((self.rows, self.in_features)) if len(self.shape) != 2 else self

    def stacked(self, shape: tuple[int, ...]) -> QuantizedWeight:
        """The inverse of :meth:`as_matrix`: the same rows read as a stack of ``shape``."""
        if math.prod(shape[:-1]) != self.rows or shape[-1] != self.in_features:
            raise ValueError(f"a {self.shape} quantized weight cannot be read as {shape}")
        return self.reshaped(tuple(shape))

    def reshaped(self, shape: tuple[int, ...]) -> QuantizedWeight:
        """The same rows under another logical shape (callers check it fits)."""
        return replace(self, shape=shape)


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


#: Dense weights an executor keeps when the budget is not set: a quarter of physical memory.
BUDGET_FRACTION = 0.25
#: Parameters a streaming executor keeps: the node in use and its neighbours (lanes advance node by node),
#: and no more bytes than STREAM_BYTES or the budget, whichever is less, unless one tensor is larger alone.
STREAM_WINDOW = 8
STREAM_BYTES = 256 << 20


_SIZE = re.compile(r"([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?")


def memory_budget() -> int:
    """Bytes of dense weights one executor may keep: ``$TOKOPT_WEIGHT_MEMORY`` (e.g. ``4GB``, ``512MB``,
    a number of bytes) or a quarter of physical memory."""
    text = os.environ.get("TOKOPT_WEIGHT_MEMORY", "").strip()
    if not text:
        return int(BUDGET_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    match = _SIZE.fullmatch(text.upper())
    if match is None:
        raise UsageError(f"TOKOPT_WEIGHT_MEMORY={text!r} is not a size; write e.g. 4GB, 512MB or a number of bytes")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2] or " "))


def dense_nbytes(params: dict[str, Weight], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of every floating parameter in ``dtype``: what keeping them all dense costs."""
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(weight_numel(w) * size for w in params.values()
               if isinstance(w, QuantizedWeight) or weight_dtype(w).startswith(("float", "bfloat")))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MAPPED_ABOVE = 1 << 20


@functools.cache
def map_large_blocks() -> None:
    """Have glibc map blocks of 1 MiB and more directly, so freeing one returns it to the system.

    glibc keeps freed blocks below its mmap threshold for reuse, and the threshold grows to
    32 MB as blocks are freed; a streaming run frees a weight-sized block per parameter, and
    its heap would keep what it freed (measured: +240 MB on a 600 MB model).  Process-wide,
    once; a no-op where the C library is not glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, _MAPPED_ABOVE)
    except (OSError, AttributeError):
        pass


def streams(params: dict[str, Weight], dtype: torch.dtype = torch.float32) -> bool:
    """Whether executors read these weights streamed (their dense size is past :func:`memory_budget`)."""
    return dense_nbytes(params, dtype) > memory_budget()


class DenseWeights:
    """Dense tensors for a graph's parameters, materialized on first use.

    Every torch executor (reference, compiled, calibration) reads weights through one of
    these, so lazy loading, exact dequantization and the cast to the compute dtype happen
    in one place.  Integer tensors keep their dtype.  A model whose dense weights fit the
    memory budget keeps them all (each is materialized once); past it the weights stream —
    only the :data:`STREAM_WINDOW` most recently used stay, so a forward holds about one
    decoder block's weights at a time (the walk reads them in order) and a model larger
    than RAM runs, paying one read and dequantization per parameter per forward.
    """

    def __init__(self, params: dict[str, Weight], dtype: torch.dtype = torch.float32,
                 stream: bool | None = None) -> None:
        self.params = params
        self.dtype = dtype
        self.stream = streams(params, dtype) if stream is None else stream
        self._window_bytes = min(STREAM_BYTES, memory_budget()) if self.stream else 0
        if self.stream:
            map_large_blocks()
        self._dense: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, name: str) -> torch.Tensor:
        w = self._dense.get(name)
        if w is None:
            if self.stream:  # room first: the weight being read and the ones it evicts never coexist
                self._evict(incoming=weight_numel(self.params[name]) * 4)
            w = materialize(self.params[name])
            if w.is_floating_point():
                w = w.to(self.dtype)
            self._keep(name, w)
        elif self.stream:
            self._dense.move_to_end(name)
        return w

    def set(self, name: str, value: Weight) -> None:
        """Replace one parameter's dense value (e.g. after quantizing it mid-calibration)."""
        self._keep(name, materialize(value, self.dtype))

    def _keep(self, name: str, w: torch.Tensor) -> None:
        self._dense[name] = w
        self._dense.move_to_end(name)
        if self.stream:
            self._evict(keep_last=True)

    def _evict(self, incoming: int = 0, keep_last: bool = False) -> None:
        """Drop the least recently used weights until the window (and ``incoming`` more bytes) fits."""
        held = sum(t.nbytes for t in self._dense.values())
        floor = 1 if keep_last else 0
        while len(self._dense) > floor and (len(self._dense) + (incoming > 0) > STREAM_WINDOW
                                            or held + incoming > self._window_bytes):
            held -= self._dense.popitem(last=False)[1].nbytes


def materialize(w: Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense tensor for ``w``; quantized weights are dequantized exactly."""
    if isinstance(w, QuantizedWeight):
        t = w.dequantize(dtype or torch.float32)
    elif isinstance(w, LazyTensor):
        t = w.materialize()
    else:
        t = w
    return t.to(dtype) if dtype is not None and t.dtype != dtype else t
