"""The TensorRT backend: honest about where it cannot run; the ONNX it consumes is portable and correct.

What can run on any machine runs here: the availability message, refusals (before any GPU
work, nothing left on disk), and the standard-op ONNX an engine would be built from —
checked with ``onnx.checker`` and executed on onnxruntime's CPU provider against the
reference executor.  Engine building and execution need TensorRT and an NVIDIA GPU and
skip (with the reason) elsewhere.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tokopt
from tokopt.backends.registry import get_backend, known_backend_names
from tokopt.backends.tensorrt.backend import tensorrt_unavailable_reason
from tokopt.errors import BackendRefusalError, BackendUnavailableError, ModelSourceError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.graph import Graph

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import sample_ids, save_tiny_llama  # noqa: E402

UNAVAILABLE = tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"TensorRT not usable here: {UNAVAILABLE}")
needs_onnxruntime = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                       reason="needs onnxruntime (pip install 'tokopt[onnx]')")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Graph:
    return tokopt.load(str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", layers=2)))


def steps(session, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    cache = session.new_cache(ids.shape[0]) if not isinstance(session, ReferenceExecutor) else session.new_cache()
    outs = [session.forward(ids[:, :prefill], cache)]
    outs += [session.forward(ids[:, i:i + 1], cache) for i in range(prefill, ids.shape[1])]
    return torch.cat(outs, dim=1)


def test_registered_and_describable_without_tensorrt():
    assert "tensorrt" in known_backend_names()
    info = get_backend("tensorrt").describe()
    assert info["name"] == "tensorrt" and info["capabilities"]["kv_dtypes"] == ["float32"]
    assert info["available"] is (UNAVAILABLE is None)


@pytest.mark.skipif(UNAVAILABLE is None, reason="TensorRT is usable on this machine")
def test_availability_says_plainly_why_not():
    ok, why = get_backend("tensorrt").availability()
    assert not ok and why == UNAVAILABLE
    if importlib.util.find_spec("tensorrt") is None:
        assert "tensorrt Python package is not installed" in why
    if not torch.cuda.is_available():
        assert "no NVIDIA GPU" in why


@pytest.mark.skipif(UNAVAILABLE is None, reason="TensorRT is usable on this machine")
def test_lower_and_load_refuse_with_the_reason_and_leave_nothing(tiny, tmp_path):
    backend = get_backend("tensorrt")
    with pytest.raises(BackendUnavailableError, match="not usable here") as err:
        backend.lower(tiny, tmp_path / "engine")
    assert UNAVAILABLE in str(err.value)
    assert list(tmp_path.iterdir()) == []
    art = tmp_path / "fake"
    art.mkdir()
    (art / "tokopt_artifact.json").write_text(json.dumps({"backend": "tensorrt", "format_version": 1}))
    with pytest.raises(BackendUnavailableError):
        backend.load(art)


def test_load_refuses_another_backends_artifact(tiny, tmp_path):
    get_backend("torch").lower(tiny, tmp_path / "torch-art")
    with pytest.raises(ModelSourceError, match="not a tensorrt one"):
        get_backend("tensorrt").load(tmp_path / "torch-art")


def test_refuses_what_the_engine_cannot_express_before_any_gpu_work(tiny, tmp_path):
    g = tiny.copy()
    for node in g.nodes("Attention"):
        node.attrs["kv_cache"] = {**node.attrs["kv_cache"], "dtype": "int8"}
    with pytest.raises(BackendRefusalError, match="int8"):
        get_backend("tensorrt").lower(g, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the ONNX the engine is built from ----------------------------------------------------------
@needs_onnxruntime
def test_portable_onnx_has_only_standard_ops_and_matches_the_reference(tiny, tmp_path):
    import onnx

    from tokopt.backends.onnxruntime.session import OnnxRuntimeSession
    from tokopt.backends.tensorrt.onnx_source import export_portable_onnx, nonstandard_ops

    exported = export_portable_onnx(tiny, tmp_path / "onnx", max_length=64)
    model = onnx.load(str(exported.path))
    onnx.checker.check_model(model, full_check=True)
    assert nonstandard_ops(model) == []
    assert {"input_ids", "attention_mask", "past_key_values.0.key"} <= set(exported.inputs)
    assert {"logits", "present.1.value"} <= set(exported.outputs)
    session = OnnxRuntimeSession(exported.path)
    ids = sample_ids(2, 12)
    torch.testing.assert_close(steps(session, ids, 8), steps(ReferenceExecutor(tiny), ids, 8), rtol=1e-4, atol=1e-4)


def test_refuses_quantized_weights_by_node_and_attribute(tiny, tmp_path):
    """TensorRT's ONNX parser has no MatMulNBits: low-bit weights are refused, never stored dequantized."""
    from tokopt.optimizer.ir.weights import QuantizedWeight, materialize, pack_codes

    g = tiny.copy()
    node = g.nodes("Linear")[1]
    name = node.params["weight"]
    w = materialize(g.params[name])
    scale = w.abs().amax(1, keepdim=True) / 127
    codes = torch.clamp(torch.round(w / scale) + 128, 0, 255)
    g.params[name] = QuantizedWeight(pack_codes(codes, 8), scale, None, 8, w.shape[1], tuple(w.shape))
    with pytest.raises(BackendRefusalError, match=re.escape(f"{node.name}: weight {name}: int8 weights")):
        get_backend("tensorrt").check(g)
    with pytest.raises(BackendRefusalError, match="int8 weights"):
        get_backend("tensorrt").lower(g, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the session's CUDA stream discipline, checked with fakes (no GPU needed) -------------------------
class _Recorder:
    """Fakes for torch.cuda's stream API and a TensorRT execution context that log, in order, what the session does."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.active: list[object] = []  # the stream torch.cuda.stream() made current, innermost last
        self.caller = object()  # the caller's current stream
        self.stream = self._stream()

    def _stream(self):
        rec = self

        class Stream:
            cuda_stream = 1234

            def wait_stream(self, other):
                rec.events.append(("wait_stream", other))

            def synchronize(self):
                rec.events.append(("synchronize", rec.current()))

        return Stream()

    def current(self):
        return self.active[-1] if self.active else self.caller

    @contextlib.contextmanager
    def use(self, stream):
        self.active.append(stream)
        try:
            yield
        finally:
            self.active.pop()

    def context(self, past_heads: int, dim: int, vocab: int):
        rec, shapes = self, {}

        class Context:
            def set_input_shape(self, name, shape):
                shapes[name] = shape
                rec.events.append(("set_input_shape", name, rec.current()))

            def get_tensor_shape(self, name):
                b, s = shapes["input_ids"]
                total = shapes["attention_mask"][1]
                return (b, s, vocab) if name == "logits" else (b, past_heads, total, dim)

            def set_tensor_address(self, name, address):
                rec.events.append(("bind", name, rec.current()))

            def execute_async_v3(self, handle):
                rec.events.append(("execute", handle, rec.current()))
                return True

        return Context()


def test_engine_inputs_are_made_on_the_engine_stream_after_the_callers_work(monkeypatch):
    from tokopt.backends.tensorrt.engine import TensorRTSession

    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "current_stream", rec.current)
    monkeypatch.setattr(torch.cuda, "stream", rec.use)
    session = TensorRTSession.__new__(TensorRTSession)
    session.device = torch.device("cpu")
    session.engine = SimpleNamespace(get_tensor_shape=lambda name: (-1, 2, -1, 4))
    session.context, session.stream = rec.context(2, 4, vocab=8), rec.stream
    session.inputs = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    session.outputs = ["logits", "present.0.key"]
    session.dtypes = {n: torch.int64 for n in session.inputs[:3]} | {n: torch.float32 for n in
                                                                     ("past_key_values.0.key", *session.outputs)}
    session.past = ["past_key_values.0.key"]
    session._dummy = torch.zeros(1)
    cache = session.new_cache(1)
    for step in (torch.tensor([[5, 6, 7]]), torch.tensor([[8]])):
        rec.events.clear()
        assert session.forward(step, cache).shape == (1, step.shape[1], 8)
        assert rec.events[0] == ("wait_stream", rec.caller)  # ordered after the caller's queued work
        execute = rec.events.index(("execute", rec.stream.cuda_stream, rec.stream))  # on the engine's stream
        made = [e for e in rec.events[1:execute] if e[0] in ("set_input_shape", "bind")]
        assert len(made) == 2 * len(session.inputs) + len(session.outputs)
        assert all(e[-1] is rec.stream for e in made)  # every input and output is made and bound there
        assert rec.events[execute + 1] == ("synchronize", rec.stream)  # finished before the logits are read
    assert cache.seen == 4 and session.kv_nbytes(cache) == 1 * 2 * 4 * 4 * 4


# -- on a machine with TensorRT and an NVIDIA GPU ---------------------------------------------------
@needs_tensorrt
def test_engine_matches_the_reference(tiny, tmp_path):
    backend = get_backend("tensorrt")
    artifact = backend.lower(tiny, tmp_path / "engine", max_length=64, max_batch=2)
    assert artifact.extra["parity"]["passed"]
    assert (tmp_path / "engine" / "model.plan").is_file()
    session = backend.load(tmp_path / "engine")
    ids = sample_ids(2, 12)
    torch.testing.assert_close(steps(session, ids, 8), steps(ReferenceExecutor(tiny), ids, 8), rtol=1e-3, atol=1e-3)
    prompt = sample_ids(1, 5, seed=2)
    assert torch.equal(session.generate(prompt, 6), ReferenceExecutor(tiny).generate(prompt, 6))
