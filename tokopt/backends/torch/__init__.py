"""The torch backend: the eager reference executor (and, later, torch.compile on top)."""

from tokopt.backends.torch.reference import ReferenceExecutor

__all__ = ["ReferenceExecutor"]
