"""Building a TensorRT engine from ONNX, and running it on torch CUDA tensors.

Build: ``trt.Builder`` → network → ``trt.OnnxParser.parse_from_file`` (external data is
read relative to the model) → ``BuilderConfig`` with one optimization profile spanning
prefill and decode shapes → ``build_serialized_network`` → ``model.plan``.  Precision
defaults to strict fp32 (TF32 off) so the engine can pass tokopt's logits parity check;
``precision="fp16"`` trades exactness for speed and is checked by top-1 agreement.

Run: ``trt.Runtime.deserialize_cuda_engine`` → ``create_execution_context``; each step
sets input shapes, binds torch CUDA tensors by address (``set_tensor_address``) and calls
``execute_async_v3`` on the session's own torch CUDA stream.  The KV cache is the ``present.*``
outputs of one step handed back as the ``past_key_values.*`` inputs of the next, never leaving the GPU.

Stream discipline: ``execute_async_v3`` only enqueues work on the stream it is given, and torch's
streams are non-blocking (no implicit ordering with the default stream), so every tensor the
engine reads or writes is created on that same stream (``torch.cuda.stream``), after a
``wait_stream`` on the caller's current stream (whose work may have produced the inputs); the
caching allocator then never hands their memory to another stream while the engine uses it.
The step ends with a ``synchronize`` of that stream before the logits are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokopt.errors import BackendRefusalError
from tokopt.optimizer.interpret.decode import GreedyGeneration

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "fp16")


@dataclass
class EngineShapes:
    """The shape envelope the engine is built for."""

    max_batch: int = 4
    max_length: int = 2048  # tokens per sequence (prompt + generated)
    opt_prefill: int = 128

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _trt():
    import tensorrt as trt

    return trt


def _logger():
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def _profile_shapes(name: str, dims: list[Any], shapes: EngineShapes) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) for one input, from its ONNX dims (named dims are dynamic).

    The optimum is a decode step (one new token after ``opt_prefill`` cached ones), with
    consistent lengths across inputs: past + new == attention mask.
    """
    b, L = shapes.max_batch, shapes.max_length
    if name in ("input_ids", "position_ids"):
        return (1, 1), (1, 1), (b, L)
    if name == "attention_mask":
        return (1, 1), (1, shapes.opt_prefill + 1), (b, L)
    if name.startswith("past_key_values."):
        heads, dim = int(dims[1]), int(dims[3])
        return (1, heads, 0, dim), (1, heads, shapes.opt_prefill, dim), (b, heads, L - 1, dim)
    raise BackendRefusalError(f"TensorRT: unexpected model input {name!r}")


def build_engine(onnx_path: Path, plan_path: Path, input_dims: dict[str, list[Any]], shapes: EngineShapes,
                 precision: str = "fp32", workspace_bytes: int = 4 << 30) -> dict[str, Any]:
    """Parse ``onnx_path`` with TensorRT's parser and write the serialized engine to ``plan_path``."""
    trt = _trt()
    if precision not in PRECISIONS:
        raise BackendRefusalError(f"TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    logger = _logger()
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendRefusalError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    tf32, fp16 = getattr(trt.BuilderFlag, "TF32", None), getattr(trt.BuilderFlag, "FP16", None)
    if precision != "tf32" and tf32 is not None:  # TF32 is on by default; strict fp32 keeps parity exact
        config.clear_flag(tf32)
    if precision == "fp16":
        if fp16 is None:
            raise BackendRefusalError(f"TensorRT {trt.__version__} has no FP16 builder flag; use precision=fp32")
        config.set_flag(fp16)
    profile = builder.create_optimization_profile()
    for name, dims in input_dims.items():
        lo, opt, hi = _profile_shapes(name, dims, shapes)
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendRefusalError("TensorRT could not build an engine for this model (see the TensorRT log above)")
    plan_path.write_bytes(bytes(serialized))
    return {"tensorrt_version": trt.__version__, "precision": precision, "shapes": shapes.to_dict(),
            "device": torch.cuda.get_device_name(0)}


@dataclass
class TrtKVCache:
    batch: int
    past: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: int = 0


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32,
                 "INT8": torch.int8, "BOOL": torch.bool, "BF16": torch.bfloat16}


class TensorRTSession(GreedyGeneration):
    """Same interface as the reference executor: ``new_cache``, ``kv_nbytes``, ``forward``, ``generate``."""

    device = torch.device("cuda")

    def __init__(self, plan_path: Path) -> None:
        trt = _trt()
        self._logger = _logger()
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise BackendRefusalError(f"{plan_path} could not be deserialized (built by another TensorRT "
                                      "version or for another GPU? rebuild it with tokopt optimize)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        with torch.cuda.stream(self.stream):
            self._dummy = torch.zeros(1, device=self.device)  # an address for zero-sized tensors

    def new_cache(self, batch: int = 1) -> TrtKVCache:
        cache = TrtKVCache(batch)
        with torch.cuda.stream(self.stream):
            for name in self.past:
                _, heads, _, dim = self.engine.get_tensor_shape(name)
                cache.past[name] = torch.zeros((batch, heads, 0, dim), dtype=self.dtypes[name], device=self.device)
        return cache

    def kv_nbytes(self, cache: TrtKVCache) -> int:
        """Bytes of the ``past_key_values`` tensors the cache holds (they grow with the context)."""
        return sum(t.numel() * t.element_size() for t in cache.past.values())

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        self.context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr())

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: TrtKVCache | None = None) -> torch.Tensor:
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        bsz, seq = input_ids.shape
        self.stream.wait_stream(torch.cuda.current_stream())  # the caller's queued work comes first
        with torch.cuda.stream(self.stream):  # everything the engine touches is made on its stream
            cache = cache if cache is not None else self.new_cache(bsz)
            total = cache.seen + seq
            feeds = {"input_ids": input_ids.to(self.device, torch.int64).contiguous(),
                     "attention_mask": torch.ones((bsz, total), dtype=torch.int64, device=self.device),
                     "position_ids": torch.arange(cache.seen, total, device=self.device).expand(bsz, seq).contiguous(),
                     **cache.past}
            for name in self.inputs:
                tensor = feeds[name].to(self.dtypes[name])
                feeds[name] = tensor
                self.context.set_input_shape(name, tuple(tensor.shape))
                self._bind(name, tensor)
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self._bind(name, outs[name])
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
            self.stream.synchronize()
            logits = outs["logits"].float().cpu()
        cache.past = {name: outs[name.replace("past_key_values.", "present.")] for name in self.past}
        cache.seen = total
        return logits
