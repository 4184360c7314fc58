"""The ``torch`` and ``torch-compile`` backends: one self-contained serialized-IR artifact, two sessions.

The artifact is the IR itself — ``graph.json`` + ``weights.safetensors`` written by
:mod:`tokopt.optimizer.ir.serialize`, quantized weights kept packed — plus the tokenizer
files and ``tokopt_artifact.json``.  Loading it needs tokopt and torch, nothing from the
original checkpoint.  ``torch`` loads the eager reference executor (the oracle);
``torch-compile`` loads :class:`~tokopt.backends.torch.compiled.CompiledSession` (KV buffers
written in place + ``torch.compile``'d decode step), which computes the same logits faster
and states its own capabilities: it has no pages, so it refuses ``paged`` storage.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from tokopt.backends.artifact import TOKENIZER_DIR, atomic_directory, copy_tokenizer, read_manifest, write_manifest
from tokopt.backends.base import Artifact, Backend, Session
from tokopt.backends.capabilities import Capabilities
from tokopt.errors import InputFileError, ModelSourceError, VerificationError
from tokopt.optimizer.ir.attrs import ACT_BITS, ACT_DTYPES, KV_LAYOUTS, KV_QUANT_DTYPES, KV_STORAGES
from tokopt.optimizer.ir.graph import Graph

log = logging.getLogger(__name__)

WEIGHT_BITS = (4, 8)


class TorchBackend(Backend):
    """The serialized IR as the artifact, run by the eager reference executor."""

    name = "torch"
    summary = "PyTorch: the eager reference executor on the serialized IR (the oracle every backend is checked against)"
    #: load options, described in the manifest
    load_options: ClassVar[dict[str, str]] = {}

    def availability(self) -> tuple[bool, str]:
        import torch

        device = "CUDA available but the sessions run on CPU" if torch.cuda.is_available() else "CPU"
        return True, f"torch {torch.__version__} ({device})"

    def capabilities(self) -> Capabilities:
        from tokopt.optimizer.interpret.kernels import KERNELS

        return Capabilities(
            ops=tuple(sorted(KERNELS)), kv_dtypes=("float32", *sorted(KV_QUANT_DTYPES)), kv_layouts=KV_LAYOUTS,
            kv_storages=KV_STORAGES, window=True, sinks=True, softcap=True, qk_norm=True, partial_rotary=True,
            act_quant_bits=ACT_BITS, act_dtypes=ACT_DTYPES, weight_bits=WEIGHT_BITS, weight_per_channel=True,
            weight_asymmetric=True,
            notes=("the serialized IR is the artifact: quantized weights are stored as their codes; the eager "
                   "executor dequantizes them once at load (exact, not faster)",))

    def lower(self, graph: Graph, out_dir: Path, *, parity: bool = True, parity_tokens: Any = None) -> Artifact:
        """Write the artifact directory atomically: graph, weights, tokenizer, manifest.

        With ``parity`` (default), the written artifact is read back and its logits compared
        with the in-memory graph's before the directory is renamed into place.
        """
        from tokopt.optimizer.ir.serialize import GRAPH_FILE, WEIGHTS_FILE, save_graph

        self.check(graph)
        out_dir = Path(out_dir)
        with atomic_directory(out_dir, empty_ok=True) as tmp:
            files = save_graph(graph, tmp)
            copied = copy_tokenizer(graph, tmp / TOKENIZER_DIR)
            tokenizer = TOKENIZER_DIR if copied else None
            files += [f"{TOKENIZER_DIR}/{name}" for name in copied]
            report = None
            if parity:
                from tokopt.backends.parity import check_parity
                from tokopt.optimizer.interpret.reference import ReferenceExecutor
                from tokopt.optimizer.ir.serialize import load_graph

                report = check_parity(graph, ReferenceExecutor(load_graph(tmp)), tokens=parity_tokens, atol=1e-5,
                                      quantized=False, label="torch artifact")
            manifest = write_manifest(tmp, self.name, files, graph, tokenizer,
                                      graph_file=GRAPH_FILE, weights_file=WEIGHTS_FILE,
                                      load_options=self.load_options,
                                      parity=report.to_dict() if report else None)
        log.info("torch artifact written to %s (%d files)", out_dir, len(manifest["files"]))
        return Artifact(out_dir, self.name, manifest["files"], {"manifest": manifest, "parity": manifest["parity"]})

    def load(self, path: Path, **options: Any) -> Session:
        """The reference executor on the artifact at ``path``."""
        from tokopt.optimizer.interpret.reference import ReferenceExecutor

        return ReferenceExecutor(self._graph(Path(path), options))

    def _graph(self, path: Path, options: dict[str, Any]) -> Graph:
        """The artifact's graph, verified, once ``options`` are known to be this backend's."""
        from tokopt.optimizer.ir.verify import verify

        unknown = sorted(set(options) - set(self.load_options))
        if unknown:
            raise ModelSourceError(f"{self.name} backend: unknown load option(s) {', '.join(unknown)}; "
                                   f"valid: {', '.join(self.load_options) or 'none'}")
        graph = load_artifact_graph(path)
        try:
            verify(graph, stage=f"artifact {path}")
        except VerificationError as exc:  # verified when written: what fails now was changed or damaged since
            raise InputFileError(f"{path}: the artifact's graph is inconsistent ({'; '.join(exc.problems[:3])}); it "
                                 "was changed or damaged since tokopt wrote it: re-create it with tokopt optimize") \
                from exc
        return graph


class TorchCompileBackend(TorchBackend):
    """The same artifact, run by the compiled session: KV buffers written in place, a compiled decode step."""

    name = "torch-compile"
    summary = ("PyTorch: torch.compile'd decode step on in-place KV buffers (int8/int4 KV as codes), "
               "from the same serialized-IR artifact as torch")
    load_options: ClassVar[dict[str, str]] = {
        "max_len": "int: tokens an unbounded layer may hold (default: the model's max positions)",
        "compile": "bool, default true (false: the same session, eager)"}

    def capabilities(self) -> Capabilities:
        from tokopt.backends.torch.compiled import GROWTH_BLOCK

        caps = super().capabilities()
        return replace(caps, kv_storages=("dynamic", "static"), notes=(
            *caps.notes, "quantized Linears keep their codes: act_dtype=bfloat16 ones with bfloat16 scales on torch's "
            "low-bit CPU kernels (symmetric int4 groups of 32-256: _weight_int4pack_mm_for_cpu; per-channel int8: "
            "_weight_int8pack_mm), per-row int8 inputs on torch._int_mm, every other 4/8-bit format in groups of "
            "32k/16k (zero points, float16/float32 scales, float or int8-block inputs) on tokopt's native kernel, "
            "built for the CPU on first use; a weight no kernel takes is dequantized once at load",
            f"static layers pre-allocate their slots; dynamic ones grow by blocks of {GROWTH_BLOCK} tokens "
            "(up to their sinks + window ring); no pages, so no paged storage"))

    def load(self, path: Path, **options: Any) -> Session:
        """The compiled session on the artifact at ``path`` (options: ``max_len``, ``compile``)."""
        from tokopt.backends.torch.compiled import CompiledSession

        graph = self._graph(Path(path), options)
        return CompiledSession(graph, compile=bool(options.get("compile", True)), max_len=options.get("max_len"))


def load_artifact_graph(path: Path) -> Graph:
    """The graph inside a torch artifact, its tokenizer path pointing into the artifact."""
    from tokopt.optimizer.ir.serialize import load_graph

    manifest = read_manifest(path)
    if manifest["backend"] not in (TorchBackend.name, TorchCompileBackend.name):
        raise ModelSourceError(f"{path} is a {manifest['backend']!r} artifact, not a torch one")
    graph = load_graph(path)
    tokenizer = manifest.get("tokenizer")
    graph.meta.tokenizer_path = str(Path(path).resolve() / tokenizer) if tokenizer else None
    return graph


__all__ = ["TorchBackend", "TorchCompileBackend", "load_artifact_graph"]
