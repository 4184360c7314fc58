"""tokopt's own low-bit CPU kernel (``lowbit_gemv.cpp``), built for this machine on first use.

The compiled session already needs a C++ compiler (inductor compiles its kernels with it), so the
kernel is built the same way: ``torch.utils.cpp_extension.load`` with ``-march=native``, cached in
torch's extension directory (``TORCH_EXTENSIONS_DIR``) under a name that carries a hash of this
CPU's feature flags — a cache shared between an AVX2 and an AVX-512 machine never hands one the
other's build.  When it cannot be built (no compiler, no AVX2) :func:`load_kernel` says why once
and returns None, and the session falls back to torch's own kernels or to dequantized weights —
the same numbers, more bytes or less speed.  ``TOKOPT_NATIVE_KERNELS=0`` turns it off (to
measure the fallbacks side by side).

The ops are registered as ``torch.ops.tokopt_lowbit.gemv`` / ``.dequantize`` with fake (shape)
implementations, so ``torch.compile`` traces through a Linear that calls them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lowbit_gemv.cpp")
ENV_SWITCH = "TOKOPT_NATIVE_KERNELS"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def enabled() -> bool:
    """Whether the native kernel may be used (``TOKOPT_NATIVE_KERNELS=0`` says no)."""
    return os.environ.get(ENV_SWITCH, "1") not in ("0", "false", "no")


@functools.cache
def load_kernel() -> ModuleType | None:
    """The built extension (its ops registered), or None with the reason logged once."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("native low-bit kernel: not built on %s (x86 AVX2/AVX-512 only)", platform.machine())
        return None
    from torch.utils import cpp_extension

    tag = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:10]
    try:
        # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers, silently serial without it; the
        # extension then shares torch's libgomp (same soname, already loaded) and its thread count
        module = cpp_extension.load(name=f"tokopt_lowbit_{tag}", sources=[str(SOURCE)],
                                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                    verbose=False)
    except Exception as exc:  # a missing compiler or ninja, a CPU without AVX2: any of them means "fall back"
        log.warning("native low-bit kernel unavailable (%s: %s); quantized Linears fall back to torch's kernels "
                    "or dequantized weights", type(exc).__name__, str(exc).strip().splitlines()[-1:])
        return None
    _register_fakes()
    log.info("native low-bit kernel built for %s", module.isa())
    return module


def _register_fakes() -> None:
    @torch.library.register_fake("tokopt_lowbit::gemv")
    def _gemv(x, packed, scales, zeros, bits, group):  # noqa: ANN001, ANN202 - torch.library's signature
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("tokopt_lowbit::dequantize")
    def _dequantize(packed, scales, zeros, bits, group, k):  # noqa: ANN001, ANN202
        return packed.new_empty(packed.shape[0], k, dtype=torch.float32)


__all__ = ["ENV_SWITCH", "enabled", "load_kernel"]
