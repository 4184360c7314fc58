"""The onnxruntime backend: lower the IR to ONNX (contrib fast paths), check parity, ship.

``lower`` writes ``model.onnx`` + ``model.onnx.data``, ``config.json``, the tokenizer,
the resolved recipe, ``genai_config.json`` (onnxruntime-genai runs the directory as is —
unless a layer keeps a bounded sliding-window ring, whose cache genai cannot feed)
and ``tokopt_artifact.json``; ``load`` opens it as an :class:`OnnxRuntimeSession`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokopt.backends.base import Artifact, Backend
from tokopt.backends.capabilities import Capabilities, check_capabilities
from tokopt.backends.onnxruntime import import_onnxruntime
from tokopt.errors import BackendUnavailableError, ModelSourceError
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import QuantizedWeight

log = logging.getLogger(__name__)

KV_LAYOUTS = ("BNSH",)
KV_STORAGES = ("dynamic", "static")
NATIVE_WEIGHT_BITS = (4, 8)
NBITS_BLOCKS = tuple(2 ** i for i in range(4, 13))  # MatMulNBits' block sizes: powers of two from 16


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    summary = ("ONNX with onnxruntime contrib fast paths (GroupQueryAttention, MatMulNBits, skip RMSNorm); "
               "external data; runs under onnxruntime-genai")
    quality_on_artifact = True

    def availability(self) -> tuple[bool, str]:
        try:
            import onnx  # noqa: F401

            ort = import_onnxruntime()
        except ImportError as exc:
            return False, f"needs onnx and onnxruntime ({exc.name} is missing): pip install 'tokopt[onnx]'"
        return True, f"onnxruntime {ort.__version__} (CPU)"

    def capabilities(self) -> Capabilities:
        from tokopt.backends.onnxruntime.ops import supported_ops
        from tokopt.backends.onnxruntime.ops.attention import KV_DTYPES

        return Capabilities(
            ops=tuple(supported_ops()), kv_dtypes=KV_DTYPES, kv_layouts=KV_LAYOUTS, kv_storages=KV_STORAGES,
            window=True, sinks=True, softcap=True, qk_norm=True, partial_rotary=True, act_quant_bits=(8,),
            weight_bits=NATIVE_WEIGHT_BITS, weight_group_sizes=NBITS_BLOCKS, weight_per_channel=True,
            weight_asymmetric=True,
            notes=("fast paths: GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization",
                   "sliding windows (+ sinks) keep a ring of sinks + window slots (standard ops)",
                   "the directory also runs under onnxruntime-genai, except with a windowed layer's ring"))

    def check(self, graph: Graph) -> None:
        from tokopt.backends.onnxruntime.ops import no_lowering_reason
        from tokopt.backends.onnxruntime.ops.nbits import storage_problem

        ok, why = self.availability()
        if not ok:
            raise BackendUnavailableError(why)
        # ops are judged by their lowering (a plugin op brings its own), the rest by the capabilities;
        # a per-channel group is stored only if in_features has a power-of-two divisor MatMulNBits can block by
        more = [f"{n.name}: {why}" for n in graph.nodes() if (why := no_lowering_reason(n.op))]
        more += [f"{n.name}: {role} {p}: {why}" for n in graph.nodes() for role, p in n.params.items()
                 if isinstance(w := graph.params[p], QuantizedWeight) and w.bits in NATIVE_WEIGHT_BITS
                 and (why := storage_problem(w))]
        check_capabilities(graph, replace(self.capabilities(), ops=None), self.name, more)

    def lower(self, graph: Graph, out_dir: Path, *, recipe: Any = None, attention: str = "auto",
              fused_norms: bool = True, fuse_qkv: bool = True, max_length: int | None = None,
              threads: int | None = None, parity: bool = True, parity_tokens: Any = None,
              min_top1: float = 0.99) -> Artifact:
        """Write the artifact directory, refusing to ship it unless its logits match the reference.

        Linears whose IR says ``act_quant`` (the quantize pass's ``act_bits=8``) run
        MatMulNBits at accuracy level 4 — onnxruntime's fastest CPU path, the one its
        model builder ships — and the reference executor computes the same int8
        activations, so the parity bar is the same for every artifact.
        """
        from tokopt.backends.artifact import atomic_directory, copy_tokenizer, write_manifest
        from tokopt.backends.onnxruntime.artifact import hf_config, write_json, write_recipe
        from tokopt.backends.onnxruntime.external_data import write_model
        from tokopt.backends.onnxruntime.genai_config import genai_can_run, genai_config
        from tokopt.backends.onnxruntime.lower import LoweringOptions, lower_graph
        from tokopt.backends.onnxruntime.roundtrip import embed_graph_description
        from tokopt.backends.parity import check_parity
        from tokopt.optimizer.corpus import has_tokenizer

        self.check(graph)
        options = LoweringOptions(attention, fused_norms, max_length, fuse_qkv)
        ctx = lower_graph(graph, options)
        embed_graph_description(ctx)

        with atomic_directory(out_dir, empty_ok=True) as tmp:
            files = write_model(ctx.b, tmp / "model.onnx")
            files.append(write_json(tmp / "config.json", hf_config(graph)))
            tokenizer = copy_tokenizer(graph, tmp, skip={"config.json"})
            files += tokenizer
            if (name := write_recipe(tmp, recipe)) is not None:
                files.append(name)
            if genai_can_run(ctx):
                files.append(write_json(tmp / "genai_config.json", genai_config(ctx, threads=threads)))
            report = None
            if parity:
                session = self.load(tmp, threads=threads, _manifest=False)
                report = check_parity(graph, session, tokens=parity_tokens, min_top1=min_top1,
                                      label="onnxruntime artifact")
                del session
            manifest = write_manifest(
                tmp, self.name, files, graph, tokenizer="." if has_tokenizer(tmp) else None, onnx_model="model.onnx",
                lowering={**options.to_dict(), "attention_mode": ctx.attention_mode, "max_length": ctx.max_length},
                kv_cache=[{"node": s.node, "index": s.index, "dtype": s.dtype} for s in ctx.kv],
                parity=report.to_dict() if report else None)
        artifact = Artifact(Path(out_dir), self.name, manifest["files"], {"parity": manifest["parity"]})
        log.info("wrote onnxruntime artifact %s (%s attention)", out_dir, ctx.attention_mode)
        return artifact

    def load(self, path: Path, threads: int | None = None, _manifest: bool = True, **options: Any):
        from tokopt.backends.onnxruntime.session import OnnxRuntimeSession

        path = Path(path)
        model = path / "model.onnx" if path.is_dir() else path
        if not model.is_file():
            raise ModelSourceError(f"{path} holds no model.onnx: not an onnxruntime artifact")
        if _manifest and path.is_dir():
            from tokopt.backends.artifact import is_artifact, read_manifest

            backend = read_manifest(path)["backend"] if is_artifact(path) else self.name
            if backend != self.name:
                raise ModelSourceError(f"{path} is a {backend!r} artifact, not an onnxruntime one")
        return OnnxRuntimeSession(model, threads=threads, **options)
