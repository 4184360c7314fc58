"""Low-bit weights for the compiled session, in the layouts of torch's CPU kernels.

A Linear whose ``act_dtype`` is ``bfloat16`` (:mod:`tokopt.optimizer.ir.attrs`) computes
``round_bf16(round_bf16(x) @ W.T)`` with ``W`` the exact dequantized weight — which is what
torch's weight-only low-bit CPU kernels compute from bfloat16 inputs:

- ``_weight_int4pack_mm_for_cpu`` for symmetric int4 groups of 32–256 (``W = (q - 8)·s`` per
  group, the codes repacked once at load by ``_convert_weight_to_int4pack_for_cpu``);
- ``_weight_int8pack_mm`` for symmetric per-channel int8 (``W = (q - 128)·s`` per row).

A Linear whose ``act_quant`` is int8 over whole rows (one block per input row) and whose weight
is symmetric per-channel int8 runs on ``torch._int_mm``: the input's codes times the weight's
codes in int32 (exact), then both scales — the definition's product to float rounding, from a
quarter of the fp32 weight bytes (SmolLM2's lm_head: 0.76 ms against 1.55 ms on
``_weight_int8pack_mm`` and 4.9 ms in float32, 2 threads).

Both read bfloat16 scales, so a weight runs on them only when its scales are stored in
bfloat16 (then the kernel's weight is the IR's to the bit; the quantize pass stores them so
for this target).  Every other weight of an ``act_dtype`` Linear — asymmetric, grouped int8,
float, an output width the int4 layout cannot tile — is dequantized once and run by the
definition's own rounding: the same numbers, at float32 speed, counted in
:attr:`LowBitWeights.kernels` so a benchmark can say which path ran.

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

from tokopt.optimizer.interpret.activations import activation_codes
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import QuantizedWeight

log = logging.getLogger(__name__)

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes
INT4_ROW_TILE = 16  # _convert_weight_to_int4pack_for_cpu packs output rows 16 at a time


def kernel_for(w: object, act_quant: dict | None = None) -> str | None:
    """The torch kernel that computes ``w`` exactly from bfloat16 inputs, or (``act_quant``) from int8 codes of
    its input (None: none does)."""
    if not isinstance(w, QuantizedWeight) or len(w.shape) != 2 or not w.symmetric:
        return None
    out_f, in_f = w.shape
    if act_quant is not None:
        whole_rows = act_quant["bits"] == 8 and act_quant["block"] == in_f
        return "int8mm" if whole_rows and w.bits == 8 and w.group_size >= in_f else None
    if w.scales.dtype != torch.bfloat16:
        return None
    if w.bits == 4 and w.group_size in INT4_GROUPS and in_f % w.group_size == 0 and out_f % INT4_ROW_TILE == 0:
        return "int4pack"
    if w.bits == 8 and w.group_size >= in_f:
        return "int8pack"
    return None


class LowBitLinear:
    """One quantized matrix in a torch low-bit kernel's layout, and its row-major codes for lookups
    (a :class:`~tokopt.optimizer.interpret.kernels.KernelWeight`)."""

    def __init__(self, w: QuantizedWeight, kernel: str) -> None:
        self.shape = tuple(w.shape)
        self.kernel = kernel
        self.group_size = w.group_size
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

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        w, rows = self._source, ids.reshape(-1)
        picked = replace(w, packed=w.packed[rows], scales=w.scales[rows], shape=(len(rows), w.in_features))
        return picked.dequantize().reshape(*ids.shape, w.in_features)


class LowBitWeights:
    """The compiled session's weight provider: low-bit kernels where the IR allows them, dense elsewhere.

    A parameter is served as a :class:`LowBitLinear` when a torch kernel computes it exactly and
    every node reading it is an Embedding or a Linear in one input format (all ``act_dtype``, or all
    the same ``act_quant``); anything else comes from ``dense`` (lazy, dequantized once).
    """

    def __init__(self, graph: Graph, dense: Callable[[str], torch.Tensor]) -> None:
        self._dense = dense
        readers: dict[str, list] = {}
        for node in graph.nodes():
            for role, pname in node.params.items():
                readers.setdefault(pname, []).append((node, role))
        self._lowbit: dict[str, LowBitLinear] = {}
        self.kernels: Counter[str] = Counter()  # act_dtype / act_quant Linears by the kernel that runs them
        for pname, users in readers.items():
            linears = [n for n, role in users if n.op == "Linear" and role == "weight"]
            formats = {(bool(n.attrs.get("act_dtype")), repr(n.attrs.get("act_quant"))) for n in linears}
            if not any(bf16 or quant != "None" for bf16, quant in formats):
                continue
            act_quant = linears[0].attrs.get("act_quant")
            kernel = kernel_for(graph.params[pname], act_quant)
            fits = len(formats) == 1 and all((n.op == "Linear" and role == "weight") or n.op == "Embedding"
                                             for n, role in users)
            if kernel is not None and fits:
                self._lowbit[pname] = LowBitLinear(graph.params[pname], kernel)
            self.kernels[kernel if kernel is not None and fits else "dequantized"] += len(linears)
        if self.kernels:
            log.info("compiled session: act_dtype / act_quant Linears by kernel: %s", dict(self.kernels))

    def __call__(self, name: str) -> torch.Tensor | LowBitLinear:
        found = self._lowbit.get(name)
        return found if found is not None else self._dense(name)


__all__ = ["INT4_GROUPS", "LowBitLinear", "LowBitWeights", "kernel_for"]
