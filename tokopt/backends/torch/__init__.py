"""The torch backend: serialized IR artifacts, run by the reference interpreter or the compiled session.

``backend.TorchBackend`` writes and loads artifacts; ``compiled.CompiledSession`` is the fast path.
"""
