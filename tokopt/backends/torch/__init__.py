"""The torch backend: the eager reference executor, and the compiled static-cache session on top.

``backend.TorchBackend`` writes and loads artifacts; ``compiled.CompiledSession`` is the fast path.
"""

from tokopt.backends.torch.reference import ReferenceExecutor

__all__ = ["ReferenceExecutor"]
