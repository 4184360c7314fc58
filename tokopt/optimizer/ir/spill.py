"""Quantized weights kept in a temporary file instead of process memory.

A quantize pass over a model past the memory budget makes about 0.6 bytes per parameter of
codes and scales (4.3 GB for a 7B model at int4 g32), which the optimizer would otherwise
hold from the moment each tensor is quantized until the artifact is written — most of a
6 GB budget.  :class:`SpilledQuantizedWeight` writes its tensors to a :class:`SpillFile` as
it is made and reads them back on every access, like a :class:`~tokopt.optimizer.ir.weights.LazyTensor`:
nothing read is kept, the reader decides.  Reads come from the page cache, which the kernel
drops under pressure, so the bytes cost no process memory.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any

import torch

from tokopt.optimizer.ir.weights import QuantizedWeight

_PARTS = ("packed", "scales", "zero_points")


class SpillFile:
    """An unnamed temporary file that tensors are appended to and read back from by offset.

    Closed (and so deleted by the system) when the last weight holding it is gone.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="tokopt-spill-")
        self._end = 0
        self._lock = threading.Lock()

    def write(self, t: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype]:
        """Append ``t``'s bytes; returns what :meth:`read` needs to make it again."""
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        with self._lock:
            offset = self._end
            self._end += data.nbytes
        written = 0
        view = memoryview(data)
        while written < data.nbytes:
            written += os.pwrite(self._file.fileno(), view[written:], offset + written)
        return offset, tuple(t.shape), t.dtype

    def read(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        buf = bytearray(nbytes)
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"spill file ended at {offset + done} of {offset + nbytes} bytes")
            done += got
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


class SpilledQuantizedWeight(QuantizedWeight):
    """A :class:`QuantizedWeight` whose packed codes, scales and zero points live in a :class:`SpillFile`.

    Built with the parent's fields (so ``dataclasses.replace`` works: it spills the new
    tensors anew); ``spill`` names the file to share, one per pass run.  Pickles as a plain
    in-memory :class:`QuantizedWeight`.
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int,
                 group_size: int, shape: tuple[int, ...], method: str = "rtn", extra: dict | None = None,
                 spill: SpillFile | None = None) -> None:
        self.bits, self.group_size, self.shape = bits, group_size, tuple(shape)
        self.method, self.extra = method, dict(extra or {})
        self._spill = spill or SpillFile()
        self._where = {name: self._spill.write(t) for name, t in zip(_PARTS, (packed, scales, zero_points), strict=True)
                       if t is not None}

    @classmethod
    def of(cls, q: QuantizedWeight, spill: SpillFile) -> SpilledQuantizedWeight:
        """``q`` written to ``spill`` (``q`` itself can then be dropped)."""
        return cls(q.packed, q.scales, q.zero_points, q.bits, q.group_size, q.shape, q.method, q.extra, spill)

    def _read(self, name: str) -> torch.Tensor | None:
        where = self._where.get(name)
        return None if where is None else self._spill.read(*where)

    @property
    def packed(self) -> torch.Tensor:  # type: ignore[override]
        return self._read("packed")

    @property
    def scales(self) -> torch.Tensor:  # type: ignore[override]
        return self._read("scales")

    @property
    def zero_points(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._read("zero_points")

    @property
    def symmetric(self) -> bool:
        return "zero_points" not in self._where

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
                   for _, shape, dtype in self._where.values())

    def reshaped(self, shape: tuple[int, ...]) -> SpilledQuantizedWeight:
        """The same spilled bytes read with another logical shape (no copy, no rewrite)."""
        other = object.__new__(SpilledQuantizedWeight)
        other.__dict__.update(self.__dict__)
        other.shape = shape
        return other

    def __reduce__(self) -> tuple[Any, ...]:
        return (QuantizedWeight, (self.packed, self.scales, self.zero_points, self.bits, self.group_size, self.shape,
                                  self.method, dict(self.extra)))

    def __repr__(self) -> str:
        return (f"SpilledQuantizedWeight(bits={self.bits}, group_size={self.group_size}, shape={self.shape}, "
                f"method={self.method!r})")
