"""The machine a report was measured on, and its memory read bandwidth.

Decoding one token must read every weight once, so on a bandwidth-bound machine the
decode speed-of-light is bandwidth / bytes read per token.  The bandwidth is *measured*
(a streaming reduction over a buffer much larger than the caches), not looked up, and
cached per machine in the user cache directory because it takes a second or two.
``TOKOPT_MEMORY_BANDWIDTH`` (bytes/s) overrides it, e.g. to compare reports across machines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import time
from functools import lru_cache
from typing import Any

from tokopt.io_boundary import env_float

log = logging.getLogger(__name__)

ENV_OVERRIDE = "TOKOPT_MEMORY_BANDWIDTH"
BUFFER_BYTES = 256 * 1024 * 1024


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken CUDA install must not break a CPU report
        pass
    return []


def machine_info() -> dict[str, Any]:
    """What the numbers in a report depend on: CPU, cores, memory, OS, Python, torch threads."""
    import torch

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory(),
        "gpus": _gpus(),
        "python": platform.python_version(),
    }


def _fingerprint(info: dict[str, Any]) -> str:
    key = {k: info[k] for k in ("hostname", "cpu", "cpu_count", "torch_threads", "memory_bytes")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def measure_bandwidth(buffer_bytes: int = BUFFER_BYTES, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (sum over a float32 buffer), best of ``repeats``."""
    import torch

    buf = torch.ones(buffer_bytes // 4, dtype=torch.float32)
    float(buf.sum())  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(buf.sum())
        best = min(best, time.perf_counter() - t0)
    return buffer_bytes / best


def _cache_file():
    from tokopt.frontends.cache import cache_dir

    return cache_dir() / "machine.json"


def bandwidth_override() -> float | None:
    """``$TOKOPT_MEMORY_BANDWIDTH`` in bytes/s (None: unset); a value that is not a positive number is refused."""
    return env_float(ENV_OVERRIDE)


@lru_cache(maxsize=1)
def memory_bandwidth(refresh: bool = False) -> dict[str, Any]:
    """``{"bytes_per_s", "source"}``: the env override, the cached measurement, or a new one."""
    override = bandwidth_override()
    if override is not None:
        return {"bytes_per_s": override, "source": f"${ENV_OVERRIDE}"}
    info = machine_info()
    key = _fingerprint(info)
    path = _cache_file()
    cached: dict[str, Any] = {}
    if path.exists() and not refresh:
        try:  # a damaged cache is measured again, never an error
            cached = json.loads(path.read_text())
            hit = cached.get(key)
            if hit is not None:
                return {"bytes_per_s": float(hit["bytes_per_s"]), "source": f"measured {hit['when']} "
                                                                            f"(cached in {path})"}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            cached = {}
    bandwidth = measure_bandwidth()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cached[key] = {"bytes_per_s": bandwidth, "when": when}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=2))
        tmp.replace(path)
    except OSError as exc:  # a read-only home must not stop a report
        log.debug("cannot cache the bandwidth measurement: %s", exc)
    return {"bytes_per_s": bandwidth, "source": f"measured {when}"}


def describe_machine() -> dict[str, Any]:
    """Machine info plus the memory bandwidth used for speed-of-light figures."""
    info = machine_info()
    bw = memory_bandwidth()
    info["memory_bandwidth_bytes_per_s"] = bw["bytes_per_s"]
    info["memory_bandwidth_source"] = bw["source"]
    return info


__all__ = ["machine_info", "measure_bandwidth", "bandwidth_override", "memory_bandwidth", "describe_machine",
           "ENV_OVERRIDE"]
