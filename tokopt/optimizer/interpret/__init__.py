"""The IR's meaning: kernels, KV cache, KV/activation quantization, and one interpreter.

Everything that computes what a graph means lives here, so that the reference executor, calibration,
healing and the compiled session agree by construction.
"""

from tokopt.optimizer.interpret.reference import ReferenceExecutor

__all__ = ["ReferenceExecutor"]
