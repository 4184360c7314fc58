"""The core: IR, op declarations, verifier and analytic cost model."""

from tokopt.errors import (
    ModelSourceError,
    TokoptError,
    UnsupportedArchitectureError,
    UnsupportedOpError,
    VerificationError,
)
from tokopt.optimizer.ir.cost import StaticMetrics, static_metrics
from tokopt.optimizer.ir.graph import Graph, ModelMeta, Node, TensorInfo, Value
from tokopt.optimizer.ir.ops import OpSpec, get_op, register_op
from tokopt.optimizer.ir.verify import verify
from tokopt.optimizer.ir.weights import LazyTensor, QuantizedWeight

__all__ = [
    "Graph", "ModelMeta", "Node", "TensorInfo", "Value", "OpSpec", "get_op", "register_op", "verify",
    "LazyTensor", "QuantizedWeight", "StaticMetrics", "static_metrics", "TokoptError", "ModelSourceError",
    "UnsupportedArchitectureError", "UnsupportedOpError", "VerificationError",
]
