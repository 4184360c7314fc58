"""The ONNX a TensorRT engine is built from: the onnxruntime backend's lowering, standard ops only.

TensorRT's ONNX parser understands the default ONNX domain, not onnxruntime's
``com.microsoft`` contrib ops, so the graph is lowered with the onnxruntime backend's
*portable* settings — attention decomposed into standard ops with a growing
``past_key_values``/``present`` cache, RMSNorm as standard ops.  Low-bit weights would need
``MatMulNBits`` (a contrib op), so the backend refuses them in ``check`` rather than storing
them dequantized; anything that still lands outside the default domain is refused by name.

This is the single place the TensorRT backend depends on the onnxruntime backend
(``tokopt.backends.onnxruntime.lower.lower_graph`` and ``external_data.write_model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokopt.errors import BackendRefusalError
from tokopt.optimizer.ir.graph import Graph

STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class PortableOnnx:
    """An ONNX model on disk plus its decoder interface."""

    path: Path
    files: list[str]
    inputs: list[str]
    outputs: list[str]
    kv: list[dict]  # [{"index", "num_kv_heads", "head_dim", "dtype"}] per attention layer
    uses_position_ids: bool


def nonstandard_ops(model) -> list[str]:
    """``domain::op`` of every node outside the default ONNX domain."""
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})


def export_portable_onnx(graph: Graph, out_dir: Path, max_length: int | None = None) -> PortableOnnx:
    """Write ``model.onnx`` (+ external data) for TensorRT into ``out_dir``."""
    import onnx

    from tokopt.backends.onnxruntime.external_data import write_model
    from tokopt.backends.onnxruntime.lower import LoweringOptions, lower_graph

    ctx = lower_graph(graph, LoweringOptions(attention="decomposed", fused_norms=False, max_length=max_length))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    files = write_model(ctx.b, path)
    model = onnx.load(str(path), load_external_data=False)
    bad = nonstandard_ops(model)
    if bad:
        raise BackendRefusalError(f"TensorRT's ONNX parser cannot read these ops of the lowered graph: "
                                  f"{', '.join(bad)}")
    return PortableOnnx(
        path=path, files=files,
        inputs=[i.name for i in model.graph.input], outputs=[o.name for o in model.graph.output],
        kv=[{"index": s.index, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "dtype": s.dtype}
            for s in ctx.kv],
        uses_position_ids=ctx.uses_position_ids)
