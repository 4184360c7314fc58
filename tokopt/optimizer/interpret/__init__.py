"""The IR's meaning: kernels, KV cache, KV/activation quantization, and one interpreter.

Everything that computes what a graph means lives here, so that the reference executor, calibration,
healing and the compiled session agree by construction: they are policies of one
:class:`~tokopt.optimizer.interpret.interpreter.Interpreter`, never copies of its walk.
"""

from tokopt.optimizer.interpret.interpreter import Interpreter, Lane
from tokopt.optimizer.interpret.reference import ReferenceExecutor

__all__ = ["Interpreter", "Lane", "ReferenceExecutor"]
