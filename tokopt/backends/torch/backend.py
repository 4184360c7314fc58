"""The ``torch`` backend: a self-contained artifact the reference executor (or the compiled session) runs.

The artifact is the IR itself — ``graph.json`` + ``weights.safetensors`` written by
:mod:`tokopt.optimizer.ir.serialize`, quantized weights kept packed — plus the tokenizer
files and ``tokopt_artifact.json``.  Loading it needs tokopt and torch, nothing from the
original checkpoint.  ``load(path)`` gives the eager reference executor (the oracle);
``load(path, compile=True)`` gives :class:`~tokopt.backends.torch.compiled.CompiledSession`
(static KV cache + ``torch.compile``'d decode step), which computes the same logits faster.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokopt.backends.artifact import TOKENIZER_DIR, atomic_directory, copy_tokenizer, read_manifest, write_manifest
from tokopt.backends.base import Artifact, Backend, Session
from tokopt.backends.capabilities import Capabilities
from tokopt.errors import ModelSourceError
from tokopt.optimizer.ir.attrs import ACT_BITS, KV_LAYOUTS, KV_QUANT_DTYPES, KV_STORAGES
from tokopt.optimizer.ir.graph import Graph

log = logging.getLogger(__name__)

WEIGHT_BITS = (4, 8)


class TorchBackend(Backend):
    """Eager reference executor and torch.compile, from a serialized-IR artifact."""

    name = "torch"
    summary = "PyTorch: the eager reference executor, or a torch.compile'd static-KV-cache session (compile=True)"

    def availability(self) -> tuple[bool, str]:
        import torch

        device = "CUDA available but the sessions run on CPU" if torch.cuda.is_available() else "CPU"
        return True, f"torch {torch.__version__} ({device})"

    def capabilities(self) -> Capabilities:
        from tokopt.optimizer.interpret.kernels import KERNELS

        return Capabilities(
            ops=tuple(sorted(KERNELS)), kv_dtypes=("float32", *sorted(KV_QUANT_DTYPES)), kv_layouts=KV_LAYOUTS,
            kv_storages=KV_STORAGES, window=True, sinks=True, softcap=True, qk_norm=True, partial_rotary=True,
            act_quant_bits=ACT_BITS, weight_bits=WEIGHT_BITS, weight_per_channel=True, weight_asymmetric=True,
            notes=("the serialized IR is the artifact: quantized weights are stored as their codes and "
                   "dequantized once at load (exact, not faster)",))

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
                                      load_options={"compile": "bool, default false", "max_len": "int"},
                                      parity=report.to_dict() if report else None)
        log.info("torch artifact written to %s (%d files)", out_dir, len(manifest["files"]))
        return Artifact(out_dir, self.name, manifest["files"], {"manifest": manifest, "parity": manifest["parity"]})

    def load(self, path: Path, **options: Any) -> Session:
        """A session on the artifact at ``path``.

        Options: ``compile`` (default False: the reference executor; True: the compiled
        static-cache session), ``max_len`` (compiled session: tokens one sequence may hold).
        """
        from tokopt.optimizer.ir.verify import verify

        unknown = sorted(set(options) - {"compile", "max_len"})
        if unknown:
            raise ModelSourceError(
                f"torch backend: unknown load option(s) {', '.join(unknown)}; valid: compile, max_len")
        graph = load_artifact_graph(Path(path))
        verify(graph, stage=f"artifact {path}")
        if options.get("compile"):
            from tokopt.backends.torch.compiled import CompiledSession

            return CompiledSession(graph, compile=True, max_len=options.get("max_len"))
        from tokopt.optimizer.interpret.reference import ReferenceExecutor

        return ReferenceExecutor(graph)


def load_artifact_graph(path: Path) -> Graph:
    """The graph inside a torch artifact, its tokenizer path pointing into the artifact."""
    from tokopt.optimizer.ir.serialize import load_graph

    manifest = read_manifest(path)
    if manifest["backend"] != TorchBackend.name:
        raise ModelSourceError(f"{path} is a {manifest['backend']!r} artifact, not a torch one")
    graph = load_graph(path)
    tokenizer = manifest.get("tokenizer")
    graph.meta.tokenizer_path = str(Path(path).resolve() / tokenizer) if tokenizer else None
    return graph


__all__ = ["TorchBackend", "load_artifact_graph"]
