"""Run a lowered model with ``onnxruntime.InferenceSession``: prefill, decode, generate.

The KV cache lives in ``OrtValue`` buffers bound with IO binding.  Models lowered with
GroupQueryAttention share one buffer between past and present (GQA writes new keys in place,
nothing is copied): ``max_length`` slots for a ``static`` cache, a block-grown buffer for a
``dynamic`` one (the IR's storage, so the measured KV memory is what the report says); models
lowered with standard ops hand each step's ``present`` outputs to the next step as ``past``
without leaving onnxruntime memory.
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokopt.backends.onnxruntime import import_onnxruntime
from tokopt.backends.onnxruntime.mapped_pages import paging_out
from tokopt.errors import KVCacheFullError
from tokopt.optimizer.interpret.decode import GreedyGeneration

log = logging.getLogger(__name__)

GROW_BLOCK = 256  # slots a dynamic shared buffer grows by (as the compiled torch session)
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


@dataclass
class OrtKVCache:
    """Cache state of one sequence batch: past buffers by input name and tokens seen."""

    batch: int
    capacity: int = 0  # slots of a shared past/present buffer
    past: dict[str, Any] = field(default_factory=dict)  # input name -> OrtValue
    seen: int = 0


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    onnxruntime folds the artifact's constant subgraphs (the int8 weights' nibble planes, blocks
    repeating per-channel scales) when the session loads; the intermediates are freed, but glibc
    keeps the pages, so SmolLM2 int8 held 1.5 GiB resident for a 0.18 GiB model (0.24 GiB after
    the trim, measured with psutil after ``InferenceSession``).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim this way
        log.debug("malloc_trim is not available")


def _genai_config(model_path: Path) -> dict[str, Any]:
    path = model_path.parent / "genai_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class OnnxRuntimeSession(GreedyGeneration):
    """Same interface as the reference executor: ``new_cache``, ``forward``, ``generate``."""

    def __init__(self, model_path: Path, threads: int | None = None, max_length: int | None = None,
                 profile_prefix: str | None = None, **session_options: Any) -> None:
        ort = import_onnxruntime()

        self.path = Path(model_path)
        self._options = {"threads": threads, "max_length": max_length, **session_options}
        opts = ort.SessionOptions()
        if profile_prefix:  # onnxruntime's own per-node timing, read back by tokopt.measure.profile
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in session_options.items():
            opts.add_session_config_entry(key, str(value))
        self.ort = ort
        with paging_out(self.path.parent):
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        release_freed_memory()
        meta = self.session.get_modelmeta().custom_metadata_map
        if "tokopt.lowering" in meta:
            lowering = json.loads(meta["tokopt.lowering"])
            self.shared_buffer = lowering.get("attention_mode") == "gqa"
            limit = int(lowering.get("max_length") or 4096)
            self.grows = lowering.get("kv_storage", "dynamic") == "dynamic"
        else:  # another tool's decoder (e.g. onnxruntime-genai's builder): its genai_config says how
            search = _genai_config(self.path).get("search", {})
            self.shared_buffer = bool(search.get("past_present_share_buffer", False))
            limit = int(search.get("max_length") or 4096)
            self.grows = False  # as onnxruntime-genai runs it: the whole max_length buffer up front
        self.max_length = min(int(max_length), limit) if max_length else limit
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def profiled(self, profile_prefix: str) -> OnnxRuntimeSession:
        """The same model and options in a new session whose onnxruntime profiler is on (``tokopt bench --profile``)."""
        return OnnxRuntimeSession(self.path, profile_prefix=profile_prefix, **self._options)

    # -- cache ------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, length: int | None = None) -> OrtKVCache:
        """An empty cache.

        A shared-buffer model reserves ``length`` slots; without one, a ``static`` cache reserves
        all of ``max_length`` (the IR's ``max_len``) and a ``dynamic`` one starts at one block and
        grows by blocks as tokens arrive, so its memory follows the context as the IR says.
        """
        default = min(GROW_BLOCK, self.max_length) if self.grows else self.max_length
        cache = OrtKVCache(batch, capacity=min(length or default, self.max_length))
        for info in self.past:
            heads, dim = self._kv_shape(info)
            length = cache.capacity if self.shared_buffer else 0
            cache.past[info.name] = self.ort.OrtValue.ortvalue_from_numpy(
                np.zeros((batch, heads, length, dim), dtype=_NP[info.type]))
        return cache

    def _kv_shape(self, info: Any) -> tuple[int, int]:
        _, heads, _, dim = info.shape
        if not isinstance(heads, int) or not isinstance(dim, int):
            decoder = _genai_config(self.path).get("model", {}).get("decoder", {})
            heads, dim = decoder["num_key_value_heads"], decoder["head_size"]
        return heads, dim

    def _grow(self, cache: OrtKVCache, total: int) -> None:
        """Move a shared buffer into one of the next block multiple holding ``total`` tokens."""
        capacity = min(self.max_length, -(-total // GROW_BLOCK) * GROW_BLOCK)
        for info in self.past:
            old = cache.past[info.name].numpy()
            new = np.zeros((*old.shape[:2], capacity, old.shape[3]), dtype=old.dtype)
            new[:, :, : cache.seen] = old[:, :, : cache.seen]
            cache.past[info.name] = self.ort.OrtValue.ortvalue_from_numpy(new)
        cache.capacity = capacity

    def kv_nbytes(self, cache: OrtKVCache) -> int:
        """Bytes the cache's past buffers hold now, read off the OrtValues themselves."""
        return sum(int(np.prod(v.shape())) * np.dtype(_NP[v.data_type()]).itemsize for v in cache.past.values())

    # -- running ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: OrtKVCache | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for ``input_ids`` continuing ``cache`` (updated in place)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        ids = input_ids.to(torch.int64).contiguous().numpy()
        bsz, seq = ids.shape
        cache = cache if cache is not None else self.new_cache(bsz, length=seq)
        if cache.batch != bsz:
            raise ValueError(f"cache holds batch {cache.batch}, input has batch {bsz}")
        total = cache.seen + seq
        if total > self.max_length:  # past the rotary tables (a windowed model's ring itself never fills)
            raise KVCacheFullError(f"{total} tokens exceed the artifact's max_length {self.max_length} (the positions "
                                   "its rotary tables and KV buffers were built for)")
        if self.shared_buffer and total > cache.capacity and self.grows and total <= self.max_length:
            self._grow(cache, total)
        if self.shared_buffer and total > cache.capacity:
            raise KVCacheFullError(f"{total} tokens exceed the KV buffer of {cache.capacity} slots; make the cache "
                                   f"with new_cache(length=...) (at most the artifact's max_length {self.max_length})")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((bsz, total), dtype=np.int64))
        if "position_ids" in self.input_names:
            pos = np.broadcast_to(np.arange(cache.seen, total, dtype=np.int64), (bsz, seq)).copy()
            binding.bind_cpu_input("position_ids", pos)
        for name, value in cache.past.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        presents = [name.replace("past_key_values.", "present.") for name in cache.past]
        for past_name, present_name in zip(cache.past, presents, strict=True):
            if self.shared_buffer:
                binding.bind_ortvalue_output(present_name, cache.past[past_name])
            else:
                binding.bind_output(present_name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        if not self.shared_buffer:
            for past_name, value in zip(cache.past, outputs[1:], strict=True):
                cache.past[past_name] = value
        cache.seen = total
        return torch.from_numpy(outputs[0].numpy())

