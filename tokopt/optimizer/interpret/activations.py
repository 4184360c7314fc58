"""Run-time activation quantization of a Linear's input: the IR's definition of ``act_quant``.

A Linear whose ``act_quant`` attribute is ``{"bits": 8, "block": B}`` multiplies its
weight by a *quantized copy* of its input: the last dimension is cut into blocks of
``B`` columns, each block gets the scale ``absmax / 127`` and every element becomes
``round_half_even(x / scale) * scale``.  This is exactly what onnxruntime's
``MatMulNBits`` computes with ``accuracy_level=4`` (int8 dot products per weight block
on x86; checked to float rounding by ``tests/test_activation_quant.py``), so the
reference executor and the onnxruntime backend agree on the numbers and the parity
check compares like with like.  Recording it in the IR, instead of as a backend
switch, is what lets the report measure its quality cost before any backend runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_jitter: dict[str, Any] = {}  # set only inside rounding_jitter()


def quantize_activations(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """``x`` fake-quantized per block of its last dimension: symmetric, absmax scaling, half-to-even."""
    codes, scale = activation_codes(x, bits, block)
    return (codes * scale).reshape(x.shape)


def activation_codes(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes (as floats) and scales of :func:`quantize_activations`: shapes ``(..., n, block)``
    and ``(..., n, 1)`` for ``n`` blocks — what an integer kernel multiplies before it scales."""
    qmax = 2 ** (bits - 1) - 1
    x = jittered(x)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = blocks.abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(blocks / safe), scale


def jittered(x: torch.Tensor) -> torch.Tensor:
    """``x`` about to be rounded at run time, perturbed inside :func:`rounding_jitter` (else as is).

    Every run-time rounding the IR defines calls it first: ``act_quant``'s codes here, and
    ``act_dtype``'s bfloat16 rounding in :func:`tokopt.optimizer.interpret.kernels.linear`.
    """
    if not _jitter:
        return x
    return x * (1 + _jitter["rel"] * torch.randn(x.shape, generator=_jitter["gen"]).to(x.dtype))


@contextmanager
def rounding_jitter(rel: float = 1e-6, seed: int = 0) -> Iterator[None]:
    """Perturb every activation rounded at run time by a relative ``rel`` before it is rounded, inside this block.

    Rounding makes a model discontinuous: an input a float rounding away from a code
    boundary lands on the other code.  Running the reference once more under a jitter the
    size of float32 arithmetic measures how far two *correct* implementations of the same
    graph may disagree, which is the bar a backend's parity is held to
    (:func:`tokopt.backends.parity.check_parity`).
    """
    _jitter.update(rel=float(rel), gen=torch.Generator().manual_seed(seed))
    try:
        yield
    finally:
        _jitter.clear()
