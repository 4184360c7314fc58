"""Quantized weights in the artifact: the IR's codes on disk, onnxruntime's view of them derived at load.

The file holds every :class:`QuantizedWeight` as the IR does — codes ``(N, groups, group·bits/8)``
(4-bit: element ``2j`` in the low nibble), float32 scales ``(N, groups)`` and zero points — so
the artifact's weight bytes are the quantized model's and the ONNX frontend reads them back
bit-identically.  What onnxruntime's kernels need beyond that is computed by constant
subgraphs (Reshape/Expand/BitShift…) that onnxruntime folds once when the session loads:

- ``MatMulNBits``/``GatherBlockQuantized`` blocks must be powers of two ≥ 16.  A group that
  is not one (per-channel int8 on SmolLM2: 576 = 64·9, 1536 = 512·3) is read as blocks of its
  largest power-of-two divisor, each repeating its group's scale and zero point: the same numbers.
- int8 weights at fp32 accuracy run as two 4-bit ``MatMulNBits`` over the codes' high and low
  nibbles (``q = 16·hi + lo``, so ``W = 16s·(hi − z_hi) + s·(lo − z_lo)``).  onnxruntime 1.32's
  CPU kernels for 8-bit weights either quantize the activations (accuracy level 4) or
  dequantize all of B on every call (~18× slower than an fp32 MatMul, measured by
  ``benchmarks/bench_int8_weights.py``); its 4-bit fp32-activation kernel is the fast exact one.
  The two planes hold exactly the int8 codes' bytes, so the file stores the planes themselves
  (``.q8hi``/``.q8lo``, MatMulNBits' layout) and the frontend recombines them: derived at load,
  the split cost SmolLM2's int8 artifact 3.5 s of every session start (4.0 s against 0.24 s for int4).
- int8 weights whose Linear quantizes its activations natively (accuracy level 4) read the codes as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tokopt.backends.onnxruntime.lower import LowerContext
from tokopt.optimizer.ir.weights import QuantizedWeight, experts_along_input, pack_codes

BITS = (4, 8)


def block_size(w: QuantizedWeight) -> int | None:
    """MatMulNBits' block for ``w``: its group's largest power-of-two divisor, if ≥ 16 (None: none fits)."""
    block = w.group_size & -w.group_size
    return block if w.bits in BITS and block >= 16 else None


def storage_problem(w: QuantizedWeight) -> str | None:
    """Why the artifact cannot hold ``w`` as low-bit codes (None: it can)."""
    if w.bits not in BITS:
        return f"int{w.bits} weights (MatMulNBits stores int4 and int8)"
    if block_size(w) is None:
        return (f"int{w.bits} groups of {w.group_size} have no power-of-two divisor >= 16 "
                "(MatMulNBits' smallest block)")
    if w.group_size != block_size(w) and w.in_features % w.group_size:
        return f"groups of {w.group_size} do not divide in_features {w.in_features}"
    return None


def native_act_quant(act_quant: dict | None, w: object) -> bool:
    """Whether MatMulNBits' accuracy level 4 is this activation quantization on this weight."""
    return (act_quant is not None and isinstance(w, QuantizedWeight) and storage_problem(w) is None
            and act_quant == {"bits": 8, "block": w.group_size} and block_size(w) == w.group_size)


def file_tensors(w: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes ``(N, groups, group·bits/8)``, scales ``(N, groups)``, zero points) as the file holds them.

    A trailing partial group is padded with the implied zero (it multiplies no input column);
    4-bit zero points are packed two per byte along the groups, as MatMulNBits reads them.
    """
    n, k = w.shape
    g, bits = w.group_size, w.bits
    groups = math.ceil(k / g)
    codes = w.codes().to(torch.uint8)
    if groups * g != k:
        codes = torch.nn.functional.pad(codes, (0, groups * g - k), value=2 ** (bits - 1))
    codes = codes.reshape(n, groups, g)
    packed = pack_codes(codes, bits)
    scales = w.scales.to(torch.float32).reshape(n, groups).contiguous().numpy()
    zp = None
    if w.zero_points is not None:
        z = w.zero_points.to(torch.uint8).reshape(n, groups)
        if bits == 4:
            z = torch.nn.functional.pad(z, (0, groups % 2), value=8)
            z = pack_codes(z, 4)
        zp = z.contiguous().numpy()
    return packed.contiguous().numpy(), scales, zp


@dataclass(frozen=True)
class StoredWeight:
    """Initializers of one quantized matrix (or several sharing a matmul, stacked along N).

    ``codes`` holds them at their width, or ``planes`` (int8 read only at fp32 accuracy) the high and
    low nibble planes, each ``(N, blocks, block/2)``; the other is None.
    """

    codes: str | None
    planes: tuple[str, str] | None
    scales: str
    zero_points: str | None
    n: int
    k: int
    bits: int
    group: int
    block: int

    @property
    def groups(self) -> int:
        return math.ceil(self.k / self.group)

    @property
    def blocks(self) -> int:
        return self.groups * self.group // self.block


def store(ctx: LowerContext, name: str, params: list[str], layout: str = "") -> StoredWeight:
    """The file's tensors for ``params`` (alike quantized, stacked along N), recorded for the frontend; once.

    An MoE expert stack ``(E, out, in)`` is stored as one matrix: ``layout=""`` lays the experts' rows one
    after another (``(E*out, in)``: gate/up, one matmul for every expert), ``"experts_along_input"`` lays them
    side by side (``(out, E*in)``: down, one matmul over the routing-weighted inputs of every expert)."""
    key = (name, "nbits", layout)
    if key in ctx.cache:
        return ctx.cache[key]
    raw: list[QuantizedWeight] = [ctx.raw(p) for p in params]
    weights = [experts_along_input(w) if layout == "experts_along_input" else w.as_matrix() for w in raw]
    tensors = [file_tensors(w) for w in weights]
    w0 = weights[0]
    b = ctx.b
    codes, planes = None, None
    all_codes = np.concatenate([t[0] for t in tensors])
    if w0.bits == 8 and all(only_planes(ctx, p) for p in params):
        planes = tuple(b.initializer(f"{name}.q8{which}", nibble_plane(all_codes, block_size(w0), which == "hi"))
                       for which in ("hi", "lo"))
    else:
        codes = b.initializer(f"{name}.q{w0.bits}", all_codes)
    scales = b.initializer(f"{name}.scales", np.concatenate([t[1] for t in tensors]))
    zp = None if tensors[0][2] is None else b.initializer(f"{name}.zero_points",
                                                           np.concatenate([t[2] for t in tensors]))
    offset = 0
    for p, w, r in zip(params, weights, raw, strict=True):
        ctx.params[p] = {"kind": "nbits", "B": codes, "planes": planes, "scales": scales, "zero_points": zp,
                         "bits": w.bits,
                         "group_size": w.group_size, "shape": list(w.shape), "method": w.method,
                         "scale_dtype": str(w.scales.dtype).removeprefix("torch."), "extra": w.extra,
                         **({"rows": [offset, offset + w.shape[0]]} if len(params) > 1 else {}),
                         **({"layout": layout or "stacked", "stack": list(r.shape)} if len(r.shape) > 2 else {})}
        offset += w.shape[0]
    stored = StoredWeight(codes, planes, scales, zp, offset, w0.shape[1], w0.bits, w0.group_size, block_size(w0))
    ctx.cache[key] = stored
    return stored


def nibble_plane(codes: np.ndarray, block: int, high: bool) -> np.ndarray:
    """int8 codes ``(N, groups, group)`` → one nibble plane ``(N, blocks, block/2)`` as 4-bit MatMulNBits reads it."""
    n = codes.shape[0]
    nibbles = torch.from_numpy((codes >> 4) if high else (codes & 15)).reshape(n, -1)
    return pack_codes(nibbles, 4).reshape(n, -1, block // 2).numpy()


def _linear_readers(ctx: LowerContext, param: str) -> list[bool]:
    """For each Linear reading ``param``: whether it reads the codes at fp32 accuracy (as nibble planes)."""
    w = ctx.raw(param)
    return [not native_act_quant(n.attrs.get("act_quant"), w) for n in ctx.readers(param)
            if n.op == "Linear" and n.params["weight"] == param]


def only_planes(ctx: LowerContext, param: str) -> bool:
    """Whether an int8 weight is read as nibble planes and never at its own width: the file stores the planes."""
    readers = _linear_readers(ctx, param)
    return ctx.raw(param).bits == 8 and bool(readers) and all(readers)


def reads_planes(ctx: LowerContext, param: str) -> bool:
    """Whether an int8 weight runs as nibble planes: some Linear reads it at fp32 accuracy."""
    return ctx.raw(param).bits == 8 and any(_linear_readers(ctx, param))


# -- the kernels' view, derived in-graph (folded at session load) -------------------------------
def _once(ctx: LowerContext, key: tuple, build) -> str:
    if key not in ctx.cache:
        ctx.cache[key] = build()
    return ctx.cache[key]


def _per_block(ctx: LowerContext, st: StoredWeight, t: str) -> str:
    """(N, groups) → (N, blocks): each group's value repeated over its blocks."""
    reps = st.group // st.block
    if reps == 1:
        return t
    b = ctx.b
    return _once(ctx, (t, "per_block"), lambda: b.op("Reshape", [
        b.op("Expand", [b.op("Unsqueeze", [t, b.const([2])]), b.const([1, 1, reps])]),
        b.const([st.n, st.blocks])], name=f"{t}/per_block"))


def _pack(ctx: LowerContext, x: str, n: int, width: int) -> str:
    """(N, width) uint8 values < 16 → (N, ⌈width/2⌉), element 2j in the low nibble (an odd width padded with 0)."""
    b = ctx.b
    if width % 2:
        x = b.op("Pad", [x, b.const([0, 0, 0, 1])])
    low, high = b.op("Split", [b.op("Reshape", [x, b.const([n, -1, 2])])], axis=2, num_outputs=2, outputs=2)
    packed = b.op("BitwiseOr", [low, b.op("BitShift", [high, b.const(4, "uint8")], direction="LEFT")])
    return b.op("Reshape", [packed, b.const([n, -1])], name=f"{x}/pack4")


def _nibble(ctx: LowerContext, x: str, high: bool) -> str:
    b = ctx.b
    if high:
        return b.op("BitShift", [x, b.const(4, "uint8")], direction="RIGHT", name=f"{x}/hi")
    return b.op("BitwiseAnd", [x, b.const(15, "uint8")], name=f"{x}/lo")


def _unpack(ctx: LowerContext, x: str, n: int, width: int) -> str:
    """Inverse of :func:`_pack`: (N, ⌈M/2⌉) → (N, M)."""
    b = ctx.b
    pairs = b.op("Concat", [b.op("Unsqueeze", [_nibble(ctx, x, False), b.const([-1])]),
                            b.op("Unsqueeze", [_nibble(ctx, x, True), b.const([-1])])], axis=-1)
    return b.op("Slice", [b.op("Reshape", [pairs, b.const([n, -1])]), b.const([0]), b.const([width]), b.const([1])])


def _codes8(ctx: LowerContext, st: StoredWeight) -> str:
    return _once(ctx, (st.codes, "codes"), lambda: ctx.b.op("Reshape", [st.codes, ctx.b.const([st.n, -1])]))


def _plane(ctx: LowerContext, st: StoredWeight, high: bool) -> tuple[str, str, str | None]:
    """MatMulNBits (B, scales, zero points) of one 4-bit nibble plane of int8 codes."""
    def build() -> tuple[str, str, str | None]:
        b = ctx.b
        if st.planes is not None:
            codes = st.planes[0 if high else 1]
        else:
            codes = b.op("Reshape", [_pack(ctx, _nibble(ctx, _codes8(ctx, st), high), st.n, st.blocks * st.block),
                                     b.const([st.n, st.blocks, st.block // 2])], name=f"{st.codes}/plane")
        scales = _per_block(ctx, st, st.scales)
        if high:
            scales = b.op("Mul", [scales, b.const(16.0, "float32")])
        if st.zero_points is not None:
            zp = _pack(ctx, _nibble(ctx, _per_block(ctx, st, st.zero_points), high), st.n, st.blocks)
        elif high:
            zp = None  # the implied 128 has high nibble 8: MatMulNBits' own default for 4 bits
        else:
            zp = b.op("ConstantOfShape", [b.const([st.n, (st.blocks + 1) // 2])],
                      value=_uint8_zero(), name=f"{st.scales}/lo_zero")
        return codes, scales, zp
    return _once(ctx, (st.scales, "plane", high), build)


def _uint8_zero():
    from onnx import numpy_helper

    return numpy_helper.from_array(np.zeros(1, dtype=np.uint8))


def _direct(ctx: LowerContext, st: StoredWeight) -> tuple[str, str, str | None]:
    """MatMulNBits (B, scales, zero points) reading the codes at their own width."""
    def build() -> tuple[str, str, str | None]:
        b = ctx.b
        reps = st.group // st.block
        if reps == 1:
            return st.codes, st.scales, st.zero_points
        codes = b.op("Reshape", [st.codes, b.const([st.n, st.blocks, st.block * st.bits // 8])])
        zp = st.zero_points
        if zp is not None:
            zp = _per_block(ctx, st, zp if st.bits == 8 else _unpack(ctx, zp, st.n, st.groups))
            zp = zp if st.bits == 8 else _pack(ctx, zp, st.n, st.blocks)
        return codes, _per_block(ctx, st, st.scales), zp
    return _once(ctx, (st.scales, "direct"), build)


def matmul(ctx: LowerContext, st: StoredWeight, x: str, name: str, accuracy: int) -> str:
    """``x @ Wᵀ`` for a stored weight; accuracy 4 quantizes ``x`` per block (the IR's ``act_quant``)."""
    b = ctx.b

    def nbits(inputs: tuple[str, str, str | None], bits: int, op_name: str) -> str:
        return b.ms("MatMulNBits", [x, *(i for i in inputs if i is not None)], K=st.k, N=st.n, bits=bits,
                    block_size=st.block, accuracy_level=accuracy, name=op_name)

    if st.bits == 4 or accuracy == 4:
        return nbits(_direct(ctx, st), st.bits, name)
    high = nbits(_plane(ctx, st, True), 4, f"{name}/hi")
    return b.op("Add", [high, nbits(_plane(ctx, st, False), 4, f"{name}/lo")], name=name)


def gather(ctx: LowerContext, st: StoredWeight, ids: str, name: str, planes: bool) -> str:
    """Rows of a quantized table, dequantized by ``GatherBlockQuantized`` as they are looked up.

    It reads the tensors the matmul reads (the lm_head's, when tied), so a quantized
    embedding costs no float copy of the table.
    """
    b = ctx.b

    def rows(inputs: tuple[str, str, str | None], bits: int, op_name: str) -> str:
        codes, scales, zp = inputs
        data = b.op("Reshape", [codes, b.const([st.n, -1])])
        out = b.ms("GatherBlockQuantized", [data, ids, scales, *([zp] if zp is not None else [])], gather_axis=0,
                   quantize_axis=1, block_size=st.block, bits=bits, name=op_name)
        if st.groups * st.group != st.k:
            out = b.op("Slice", [out, b.const([0]), b.const([st.k]), b.const([-1])])
        return out

    if not planes:
        return rows(_direct(ctx, st), st.bits, name)
    return b.op("Add", [rows(_plane(ctx, st, True), 4, f"{name}/hi"), rows(_plane(ctx, st, False), 4, f"{name}/lo")],
                name=name)
