"""Low-bit weights for the compiled session: kept as codes in memory and run on low-bit kernels.

Every 2-D :class:`~tokopt.optimizer.ir.weights.QuantizedWeight` read only by Linears (and an
Embedding tied to them) stays low-bit in the session, on the first kernel that computes its
Linears' definition (:mod:`tokopt.optimizer.interpret.kernels`: float inputs, ``act_dtype``'s
bfloat16 rounding, ``act_quant``'s run-time int8 inputs):

- ``int8mm``: per-channel symmetric int8 whose Linears quantize their input over whole rows
  (``act_quant``) runs on ``torch._int_mm`` — the input's codes times the weight's codes in int32
  (exact), then both scales (SmolLM2's lm_head: 0.76 ms against 1.55 ms on
  ``_weight_int8pack_mm`` and 4.9 ms in float32, 2 threads);
- ``int4pack`` / ``int8pack``: torch's ``_weight_int4pack_mm_for_cpu`` (symmetric int4 groups of
  32–256, codes repacked at load) and ``_weight_int8pack_mm`` (symmetric per-channel int8) for
  ``act_dtype=bfloat16`` Linears with bfloat16 scales (then the kernel's weight is the IR's to
  the bit) — the quantize pass's default for this target; at one token they read 1.4–2.2× the
  bytes per second the native kernel does (``python benchmarks/bench_native_lowbit.py``);
- ``native``: tokopt's own kernel (:mod:`tokopt.backends.torch.native`, built for the machine on
  first use) for every other 4- and 8-bit format in groups of 32·k (4-bit) or 16·k (8-bit) or per
  channel — zero points, float16/float32 scales, float inputs, ``act_quant`` blocks (its input
  fake-quantized first, as the definition says) — on the IR's own packed codes, so nothing is
  repacked and no float copy is held.  Up to :data:`GEMV_ROWS` input rows (decode) it streams the
  codes; a longer input (prefill) dequantizes the matrix once for that call and multiplies in
  float32.  Float32 accumulation: the definition's product up to the order of the sums.

Every other weight is dequantized once and run by the definition — the same numbers at float32
speed, counted in :attr:`LowBitWeights.kernels` so a benchmark can say which path ran.

An embedding table tied to such a Linear (SmolLM2's ``lm_head``) is looked up from the same
object: its rows are dequantized as they are read, so the session holds no float copy of the
table.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import torch

from tokopt.backends.torch import native
from tokopt.optimizer.interpret.activations import activation_codes, quantize_activations
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import QuantizedWeight

log = logging.getLogger(__name__)

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes
INT4_ROW_TILE = 16  # _convert_weight_to_int4pack_for_cpu packs output rows 16 at a time
#: Input rows up to which the native kernel streams the codes; past it (prefill) one dequantized copy per call and
#: a float32 GEMM win: SmolLM2's Linears at 2 threads, ``python benchmarks/bench_native_lowbit.py``.
GEMV_ROWS = 8
NATIVE_SCALES = (torch.float32, torch.float16, torch.bfloat16)


def native_fits(w: QuantizedWeight) -> bool:
    """Whether the native kernel computes ``w``: 4-bit groups of 32·k or 8-bit of 16·k, or per channel alike."""
    in_f = w.in_features
    step = 32 if w.bits == 4 else 16
    return (w.bits in (4, 8) and in_f % w.group_size == 0 and w.group_size % step == 0
            and w.scales.dtype in NATIVE_SCALES
            and (w.zero_points is None or w.zero_points.dtype == torch.uint8))


def kernel_for(w: object, act_quant: dict | None = None, act_dtype: str | None = None,
               native: bool = False) -> str | None:
    """The kernel that computes a Linear reading ``w`` with inputs in the given format (None: none does).

    ``native``: whether tokopt's own kernel is built (:func:`tokopt.backends.torch.native.load_kernel`).
    """
    if not isinstance(w, QuantizedWeight) or len(w.shape) != 2:
        return None
    out_f, in_f = w.shape
    if (act_quant is not None and w.symmetric and act_quant["bits"] == 8 and act_quant["block"] == in_f
            and w.bits == 8 and w.group_size >= in_f):
        return "int8mm"
    if act_dtype is not None and act_quant is None and w.symmetric and w.scales.dtype == torch.bfloat16:
        if (w.bits == 4 and w.group_size in INT4_GROUPS and in_f % w.group_size == 0
                and out_f % INT4_ROW_TILE == 0):
            return "int4pack"
        if w.bits == 8 and w.group_size >= in_f:
            return "int8pack"
    return "native" if native and native_fits(w) else None


class CodesLookup:
    """An embedding lookup from a quantized table's codes: only the rows read are dequantized."""

    _source: QuantizedWeight

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        w, rows = self._source, ids.reshape(-1)
        picked = replace(w, packed=w.packed[rows], scales=w.scales[rows], shape=(len(rows), w.in_features),
                         zero_points=None if w.zero_points is None else w.zero_points[rows])
        return picked.dequantize().reshape(*ids.shape, w.in_features)


class NativeLinear(CodesLookup):
    """One quantized matrix run by tokopt's own kernel on the IR's packed codes (a
    :class:`~tokopt.optimizer.interpret.kernels.KernelWeight`)."""

    kernel = "native"

    def __init__(self, w: QuantizedWeight) -> None:
        self.shape = tuple(w.shape)
        self.bits, self.group_size = w.bits, w.group_size
        self._source = w
        self.packed = w.packed.contiguous()
        self.scales = w.scales.reshape(w.rows, w.n_groups).contiguous()
        self.zeros = None if w.zero_points is None else w.zero_points.reshape(w.rows, w.n_groups).contiguous()
        self.layout = (self.kernel, self.bits, self.group_size, self.zeros is None, self.scales.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.shape[1]).float()
        args = (self.packed, self.scales, self.zeros, self.bits, self.group_size)
        if flat.shape[0] <= GEMV_ROWS:
            y = torch.ops.tokopt_lowbit.gemv(flat, *args)
        else:
            y = flat @ torch.ops.tokopt_lowbit.dequantize(*args, self.shape[1]).t()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.shape[0])

    def quantized_matmul(self, x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
        return self.matmul(quantize_activations(x, bits, block))


class LowBitLinear(CodesLookup):
    """One quantized matrix in a torch low-bit kernel's layout, and its row-major codes for lookups
    (a :class:`~tokopt.optimizer.interpret.kernels.KernelWeight`)."""

    def __init__(self, w: QuantizedWeight, kernel: str) -> None:
        self.shape = tuple(w.shape)
        self.kernel = kernel
        self.group_size = w.group_size
        self.layout = (kernel, w.group_size)
        self._source = w  # row-major codes and scales: an embedding lookup dequantizes the rows it reads
        codes = w.codes()
        scales = w.scales.reshape(w.rows, w.n_groups)
        if kernel == "int4pack":
            self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
            # (groups, out, 2): scale and a float zero, W = (q - 8) * scale + zero; symmetric: zero 0
            self.scales = torch.stack([scales, torch.zeros_like(scales)], -1).transpose(0, 1).contiguous()
        else:
            self.packed = (codes - 128).to(torch.int8).contiguous()
            self.scales = scales[:, 0].contiguous() if kernel == "int8pack" else scales[:, 0].float().contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.shape[1])
        if self.kernel == "int4pack":
            y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales)
        else:
            y = torch._weight_int8pack_mm(flat, self.packed, self.scales)
        return y.reshape(*x.shape[:-1], self.shape[0])

    def quantized_matmul(self, x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
        flat = x.reshape(-1, self.shape[1])
        codes, scale = activation_codes(flat, bits, block)  # block = the whole row: one scale per row
        acc = torch._int_mm(codes.reshape(flat.shape).to(torch.int8), self.packed.t())
        return (acc.to(torch.float32) * (scale.reshape(-1, 1) * self.scales)).reshape(*x.shape[:-1], self.shape[0])


class LowBitWeights:
    """The compiled session's weight provider: low-bit kernels where the IR allows them, dense elsewhere.

    A quantized parameter is served as a :class:`NativeLinear` or :class:`LowBitLinear` when
    :func:`kernel_for` finds a kernel for it and every node reading it is an Embedding or a Linear in
    one input format (all float, all ``act_dtype``, or all the same ``act_quant``); anything else comes
    from ``dense`` (lazy, dequantized once).  ``native=None`` uses the native kernel when it is enabled
    and builds (:mod:`tokopt.backends.torch.native`), asked only once a quantized Linear is met.
    """

    def __init__(self, graph: Graph, dense: Callable[[str], torch.Tensor], native_kernel: bool | None = None) -> None:
        self._dense = dense
        readers: dict[str, list] = {}
        for node in graph.nodes():
            for role, pname in node.params.items():
                readers.setdefault(pname, []).append((node, role))
        self._lowbit: dict[str, NativeLinear | LowBitLinear] = {}
        self.kernels: Counter[str] = Counter()  # quantized Linears by the kernel that runs them
        for pname, users in readers.items():
            w = graph.params[pname]
            linears = [n for n, role in users if n.op == "Linear" and role == "weight"]
            if not linears or not isinstance(w, QuantizedWeight):
                continue
            formats = {(n.attrs.get("act_dtype"), repr(n.attrs.get("act_quant"))) for n in linears}
            fits = len(formats) == 1 and all((n.op == "Linear" and role == "weight") or n.op == "Embedding"
                                             for n, role in users)
            if native_kernel is None:
                native_kernel = native.enabled() and native.load_kernel() is not None
            attrs = linears[0].attrs
            kernel = kernel_for(w, attrs.get("act_quant"), attrs.get("act_dtype"), native_kernel) if fits else None
            if kernel == "native":
                self._lowbit[pname] = NativeLinear(w)
            elif kernel is not None:
                self._lowbit[pname] = LowBitLinear(w, kernel)
            self.kernels[kernel or "dequantized"] += len(linears)
        if self.kernels:
            log.info("compiled session: quantized Linears by kernel: %s", dict(self.kernels))

    def __call__(self, name: str) -> torch.Tensor | NativeLinear | LowBitLinear:
        found = self._lowbit.get(name)
        return found if found is not None else self._dense(name)


__all__ = ["GEMV_ROWS", "INT4_GROUPS", "LowBitLinear", "LowBitWeights", "NativeLinear", "kernel_for", "native_fits"]
