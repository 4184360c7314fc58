"""The torch backend: serialized IR artifacts, run by the reference interpreter or the compiled session.

``backend.TorchBackend`` writes artifacts and loads the reference executor; ``backend.TorchCompileBackend``
loads the same artifact as ``compiled.CompiledSession``, the fast path.
"""
