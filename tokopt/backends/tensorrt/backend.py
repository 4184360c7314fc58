"""The ``tensorrt`` backend: portable ONNX → TensorRT engine → session on an NVIDIA GPU.

``lower`` exports the graph to standard-op ONNX (:mod:`.onnx_source`, built on the
onnxruntime backend's lowering), builds a serialized engine with TensorRT's own ONNX
parser (:mod:`.engine`), checks the engine's logits against the reference executor, and
writes ``model.plan`` + the ONNX (engines are tied to one GPU and TensorRT version; the
ONNX lets a user rebuild) + tokenizer + ``tokopt_artifact.json`` atomically.

Where TensorRT cannot run — no ``tensorrt`` package, its libraries missing, or no NVIDIA
GPU — ``availability()`` says which, and ``lower``/``load`` raise
:class:`~tokopt.errors.BackendUnavailableError` with that message.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokopt.backends.artifact import TOKENIZER_DIR, atomic_directory, copy_tokenizer, read_manifest, write_manifest
from tokopt.backends.base import Artifact, Backend, Session
from tokopt.backends.capabilities import Capabilities, check_capabilities
from tokopt.errors import BackendUnavailableError, ModelSourceError
from tokopt.optimizer.ir.graph import Graph

log = logging.getLogger(__name__)

KV_DTYPES = ("float32",)
PLAN_FILE = "model.plan"
ONNX_DIR = "onnx"


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can.  Cheap; never raises."""
    reasons = []
    if importlib.util.find_spec("tensorrt") is None:
        reasons.append("the tensorrt Python package is not installed (pip install 'tokopt[tensorrt]' on a "
                       "Linux/Windows machine with an NVIDIA GPU and driver)")
    else:
        try:
            import tensorrt  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a broken install shows up as many error types
            reasons.append(f"the tensorrt package is installed but its libraries do not load "
                           f"({type(exc).__name__}: {exc})")
    try:
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
            reasons.append(f"no NVIDIA GPU is visible to torch (torch {torch.__version__}, {build}); TensorRT "
                           "engines run on NVIDIA GPUs only")
    except ImportError:  # pragma: no cover - torch is a dependency
        reasons.append("torch is not installed")
    if importlib.util.find_spec("onnx") is None:
        reasons.append("the onnx package is missing (pip install 'tokopt[tensorrt]')")
    return "; ".join(reasons) or None


def _portable_ops() -> tuple[str, ...] | None:
    """Ops the portable ONNX export lowers (None when onnx is missing: the export will say so)."""
    if importlib.util.find_spec("onnx") is None:
        return None
    from tokopt.backends.onnxruntime.ops import supported_ops

    return tuple(supported_ops())


class TensorRTBackend(Backend):
    name = "tensorrt"
    summary = "NVIDIA TensorRT engine built from tokopt's standard-op ONNX with TensorRT's ONNX parser (GPU)"

    def availability(self) -> tuple[bool, str]:
        why = tensorrt_unavailable_reason()
        if why:
            return False, why
        import tensorrt as trt
        import torch

        return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"

    def capabilities(self) -> Capabilities:
        return Capabilities(
            ops=_portable_ops(), kv_dtypes=KV_DTYPES, kv_layouts=("BNSH",), kv_storages=("dynamic",),
            window=True, sinks=True, softcap=True, qk_norm=True, partial_rotary=True, act_quant_bits=(8,),
            notes=("engine built from tokopt's standard-op ONNX (decomposed attention) by TensorRT's ONNX parser",
                   "precisions: fp32, tf32, fp16", "needs an NVIDIA GPU and tensorrt>=10",
                   "no low-bit weights: TensorRT's ONNX parser has no MatMulNBits"))

    def check(self, graph: Graph) -> None:
        """Refuse what the portable ONNX (and so the engine) cannot express, before any GPU work."""
        caps, no_lowering = self.capabilities(), []
        if caps.ops is not None:  # ops are judged by their ONNX lowering (a plugin op brings its own)
            from tokopt.backends.onnxruntime.ops import no_lowering_reason

            no_lowering = [f"{n.name}: {why}" for n in graph.nodes() if (why := no_lowering_reason(n.op))]
        check_capabilities(graph, replace(caps, ops=None), self.name, no_lowering)

    def _require(self) -> None:
        why = tensorrt_unavailable_reason()
        if why:
            raise BackendUnavailableError(f"the tensorrt backend is not usable here: {why}")

    def lower(self, graph: Graph, out_dir: Path, *, precision: str = "fp32", max_batch: int = 4,
              max_length: int | None = None, parity: bool = True, parity_tokens: Any = None) -> Artifact:
        """Build and check the engine; write the artifact directory atomically."""
        import onnx

        from tokopt.backends.parity import check_parity
        from tokopt.backends.tensorrt.engine import EngineShapes, build_engine
        from tokopt.backends.tensorrt.onnx_source import export_portable_onnx

        self.check(graph)
        self._require()
        length = int(max_length or min(graph.meta.max_positions or 2048, 2048))
        shapes = EngineShapes(max_batch=max_batch, max_length=length, opt_prefill=min(128, length - 1))
        with atomic_directory(out_dir, empty_ok=True) as tmp:
            exported = export_portable_onnx(graph, tmp / ONNX_DIR, max_length=length)
            model = onnx.load(str(exported.path), load_external_data=False)
            dims = {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                             for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
            build = build_engine(exported.path, tmp / PLAN_FILE, dims, shapes, precision)
            files = [PLAN_FILE, *(f"{ONNX_DIR}/{f}" for f in exported.files)]
            copied = copy_tokenizer(graph, tmp / TOKENIZER_DIR)
            tokenizer = TOKENIZER_DIR if copied else None
            files += [f"{TOKENIZER_DIR}/{name}" for name in copied]
            report = None
            if parity:
                from tokopt.backends.tensorrt.engine import TensorRTSession

                session = TensorRTSession(tmp / PLAN_FILE)
                loose = precision != "fp32"
                report = check_parity(graph, session, tokens=parity_tokens, quantized=loose or None,
                                      label=f"tensorrt {precision} engine")
                del session
            manifest = write_manifest(tmp, self.name, files, graph, tokenizer, engine=PLAN_FILE,
                                      onnx_model=f"{ONNX_DIR}/model.onnx", build=build,
                                      parity=report.to_dict() if report else None)
        return Artifact(Path(out_dir), self.name, manifest["files"], {"parity": manifest["parity"]})

    def load(self, path: Path, **options: Any) -> Session:
        from tokopt.backends.tensorrt.engine import TensorRTSession

        if options:
            raise ModelSourceError(f"tensorrt backend: unknown load option(s) {', '.join(sorted(options))}")
        manifest = read_manifest(path)
        if manifest["backend"] != self.name:
            raise ModelSourceError(f"{path} is a {manifest['backend']!r} artifact, not a tensorrt one")
        self._require()
        return TensorRTSession(Path(path) / manifest.get("engine", PLAN_FILE))


__all__ = ["TensorRTBackend", "tensorrt_unavailable_reason"]
