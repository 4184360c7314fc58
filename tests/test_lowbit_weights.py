"""Low-bit weights in the compiled session: quantized Linears on low-bit CPU kernels, with the reference's logits.

The IR defines each Linear's inputs (float, ``act_dtype=bfloat16``: input and product rounded to
bfloat16, or ``act_quant``: int8 codes per block) and its exact dequantized weight; the reference
executor computes that definition, and the compiled session runs the same Linears on tokopt's native
kernel (every 4/8-bit format that tiles), on ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm``
/ ``torch._int_mm`` where those compute the stored format exactly, or on dequantized weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tokopt
from tokopt.backends.registry import get_backend
from tokopt.backends.torch.compiled import CompiledSession
from tokopt.backends.torch.lowbit import GEMV_ROWS, NativeLinear, kernel_for, native_fits
from tokopt.backends.torch.native import ENV_SWITCH, load_kernel
from tokopt.errors import BackendRefusalError, PassOptionError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.interpret.kernels import linear
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import QuantizedWeight
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.quant.rtn import quantize_rtn
from tokopt.passes.quantize import QuantizePass

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import sample_ids, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
#: The kernels accumulate in another order than ATen's matmul: a product may land on the other side of a
#: bfloat16 rounding boundary (one bfloat16 ulp, 0.4 %), which later layers carry; seen exact on AVX-512.
LOGIT_ATOL = 0.05


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Graph:
    """A 3-layer llama whose embedding and lm_head share one tensor (as SmolLM2's do)."""
    return tokopt.load(str(save_tiny_llama(tmp_path_factory.mktemp("tied") / "llama", layers=3,
                                           tie_word_embeddings=True)))


def quantized(graph: Graph, backend: str = "torch-compile", **opts) -> Graph:
    return QuantizePass(method="rtn", **opts).run(graph, PassContext(backend=backend)).graph


def prefill_and_decode(session, ids: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Logits of a prefill and ``steps`` greedy decode steps, concatenated along the sequence."""
    with torch.inference_mode():
        cache = session.new_cache()
        out = [session.forward(ids, cache)]
        for _ in range(steps):
            out.append(session.forward(out[-1][:, -1:].argmax(-1), cache))
    return torch.cat(out, 1)


def test_the_reference_rounds_input_and_product_to_bfloat16_before_the_bias():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 32) * 3, torch.randn(16, 32), torch.randn(16)
    expected = (x.bfloat16().float() @ w.T).bfloat16().float() + b
    got = linear(x, w, b, None, "bfloat16")
    assert torch.equal(got, expected)
    assert not torch.equal(got, torch.nn.functional.linear(x, w, b))  # the rounding is there


@pytest.mark.parametrize("opts, kernel, native", [
    ({"bits": 4}, "int4pack", True), ({"bits": 8}, "int8pack", True),
    ({"bits": 4, "symmetric": False}, "native", True), ({"bits": 8, "group_size": 32}, "native", True),
    ({"bits": 4}, "int4pack", False), ({"bits": 4, "symmetric": False}, "dequantized", False)])
def test_the_compiled_session_runs_low_bit_kernels_with_the_reference_logits(tied, opts, kernel, native, monkeypatch):
    if native:
        require_native()
    else:
        monkeypatch.setenv(ENV_SWITCH, "0")
    g = quantized(tied, **opts)
    linears = g.nodes("Linear")
    assert {n.attrs["act_dtype"] for n in linears} == {"bfloat16"}
    session = CompiledSession(g, compile=True, max_len=64)
    assert dict(session._weights.kernels) == {kernel: len(linears)}
    ids = sample_ids(2, 12)
    got, expected = prefill_and_decode(session, ids), prefill_and_decode(ReferenceExecutor(g), ids)
    assert torch.allclose(got, expected, atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def require_native() -> None:
    """The native kernel's tests fail where it should build (x86 with a compiler) and skip only elsewhere."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the native low-bit kernel is x86-only")
    assert load_kernel() is not None, "the native low-bit kernel did not build (see the log)"


@pytest.mark.parametrize("bits, group, symmetric, scale_dtype", [
    (4, 32, True, "float32"), (4, 64, False, "float16"), (4, -1, True, "bfloat16"),
    (8, -1, True, "bfloat16"), (8, 32, False, "float32"), (8, 16, True, "float16")])
@pytest.mark.parametrize("rows", [1, 3, GEMV_ROWS + 5])
def test_the_native_kernel_computes_the_dequantized_product(bits, group, symmetric, scale_dtype, rows):
    """Every format it takes, against float64 products with the IR's own dequantized weight; decode-sized inputs
    stream the codes, a prefill-sized one goes through the kernel's dequantized copy."""
    require_native()
    gen = torch.Generator().manual_seed(bits * 100 + rows)
    w = quantize_rtn(torch.randn(70, 128, generator=gen), bits, group, symmetric, scale_dtype)
    assert native_fits(w)
    x = torch.randn(2, rows, 128, generator=gen) * 3
    expected = x.double() @ w.dequantize().double().T
    got = NativeLinear(w).matmul(x)
    assert got.dtype == torch.float32 and got.shape == (2, rows, 70)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    rounded = NativeLinear(w).matmul(x.bfloat16())  # act_dtype=bfloat16: the product comes back rounded
    assert rounded.dtype == torch.bfloat16
    assert torch.allclose(rounded.double(), x.bfloat16().double() @ w.dequantize().double().T, rtol=1e-2, atol=1e-2)


def test_the_native_kernel_refuses_what_it_cannot_tile():
    w = torch.randn(32, 96)
    assert not native_fits(quantize_rtn(w, 4, 16, True, "float16"))  # int4 groups of 32·k
    assert not native_fits(quantize_rtn(w, 8, 8, True, "float16"))  # int8 groups of 16·k
    assert native_fits(quantize_rtn(w, 8, 16, True, "float16"))
    assert kernel_for(quantize_rtn(w, 4, 32, True, "float16"), native=True) == "native"
    require_native()
    q = quantize_rtn(w, 4, 32, True, "float32")
    with pytest.raises(RuntimeError, match="does not tile"):
        torch.ops.tokopt_lowbit.gemv(torch.randn(1, 96), q.packed, q.scales, None, 4, 48)


@pytest.mark.parametrize("act_bits", [0, 8])
def test_float_and_int8_input_linears_keep_their_codes_in_the_compiled_session(tied, act_bits):
    """A graph quantized for onnxruntime (float inputs, or int8 inputs per block of 32) runs on the native kernel
    instead of a dequantized float copy, with the reference's logits (int8 inputs: the jitter-calibrated bar)."""
    from tokopt.backends.parity import check_parity

    require_native()
    g = quantized(tied, backend="onnxruntime", bits=4, act_bits=act_bits)
    linears = g.nodes("Linear")
    assert all(n.attrs.get("act_dtype") is None for n in linears)
    session = CompiledSession(g, compile=True, max_len=128)
    assert dict(session._weights.kernels) == {"native": len(linears)}
    dense = session._weights._dense._dense  # what was materialized in float: the norms' gains, no quantized weight
    assert dense and not any(isinstance(g.params[name], QuantizedWeight) for name in dense)
    assert check_parity(g, session, label="compiled").passed
    ids = sample_ids(2, 12)
    got, expected = prefill_and_decode(session, ids), prefill_and_decode(ReferenceExecutor(g), ids)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    if not act_bits:
        assert torch.allclose(got, expected, atol=1e-3, rtol=0)


def test_int8_inputs_per_row_run_on_int_mm_with_the_reference_logits(tied):
    """act_quant over whole rows with per-channel int8 codes: integer dot products (torch._int_mm), then both
    scales — the definition to float rounding, held to the jitter-calibrated parity bar of run-time rounding."""
    from tokopt.backends.parity import check_parity

    g = quantized(tied, bits=8, group_size=-1, act_bits=8)
    linears = g.nodes("Linear")
    widths = {n.name: g.params[n.params["weight"]].in_features for n in linears}
    assert all(n.attrs["act_quant"]["block"] == widths[n.name] for n in linears)
    session = CompiledSession(g, compile=True, max_len=128)
    assert dict(session._weights.kernels) == {"int8mm": len(linears)}
    x = torch.randn(3, 5, widths[linears[0].name]) * 4
    w = session._weights(linears[0].params["weight"])
    expected = linear(x, g.params[linears[0].params["weight"]].dequantize(), None, linears[0].attrs["act_quant"])
    assert torch.allclose(w.quantized_matmul(x, 8, x.shape[-1]), expected, rtol=1e-5, atol=1e-4)
    assert check_parity(g, session, label="compiled").passed
    ids = sample_ids(2, 12)
    got, ref = prefill_and_decode(session, ids), prefill_and_decode(ReferenceExecutor(g), ids)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_a_tied_embedding_is_looked_up_from_the_low_bit_weight_without_a_float_copy(tied):
    g = quantized(tied, bits=4)
    table = g.nodes("Embedding")[0].params["weight"]
    assert any(n.params["weight"] == table for n in g.nodes("Linear"))  # tied: the lm_head reads the same tensor
    session = CompiledSession(g, compile=False, max_len=64)
    prefill_and_decode(session, sample_ids(1, 6), steps=1)
    assert table not in session._weights._dense._dense  # never dequantized as a whole
    ids = sample_ids(1, 5)
    assert torch.equal(session._weights(table).lookup(ids), g.params[table].dequantize()[ids])


def test_kernels_take_only_what_they_compute_exactly():
    w = torch.randn(32, 64)

    bf16 = {"act_dtype": "bfloat16"}  # torch's own kernels: bfloat16 inputs only
    assert kernel_for(quantize_rtn(w, 4, 32, True, "bfloat16"), **bf16) == "int4pack"
    assert kernel_for(quantize_rtn(w, 4, 32, True, "bfloat16")) is None  # float inputs
    assert kernel_for(quantize_rtn(w, 4, 32, True, "float16"), **bf16) is None  # the kernel reads bfloat16 scales
    assert kernel_for(quantize_rtn(w, 4, 32, False, "bfloat16"), **bf16) is None  # zero points: not exact in bf16
    assert kernel_for(quantize_rtn(w, 8, -1, True, "bfloat16"), **bf16) == "int8pack"
    assert kernel_for(quantize_rtn(w, 8, 32, True, "bfloat16"), **bf16) is None  # int8pack is per-channel
    assert kernel_for(quantize_rtn(torch.randn(24, 64), 4, 32, True, "bfloat16"), **bf16) is None  # rows tile by 16
    rows = {"bits": 8, "block": 64}
    assert kernel_for(quantize_rtn(w, 8, -1, True, "float32"), rows) == "int8mm"  # any scale dtype: exact in fp32
    assert kernel_for(quantize_rtn(w, 8, 32, True, "float32"), rows) is None  # _int_mm has no per-group scales
    assert kernel_for(quantize_rtn(w, 8, -1, True, "float32"), {"bits": 8, "block": 32}) is None  # per block
    assert kernel_for(quantize_rtn(w, 8, -1, False, "float32"), rows) is None  # zero points


def test_act_dtype_defaults_to_the_target_and_is_refused_where_it_is_not_honoured(tied):
    ort = quantized(tied, backend="onnxruntime", bits=4)
    assert all(n.attrs.get("act_dtype") is None for n in ort.nodes("Linear"))
    compiled = quantized(tied, bits=4)
    w = next(v for v in compiled.params.values() if isinstance(v, QuantizedWeight))
    assert w.scales.dtype == torch.bfloat16  # what the kernel reads: the IR's bytes are the artifact's
    assert all(n.attrs.get("act_dtype") is None for n in quantized(tied, bits=4, act_dtype="float32").nodes("Linear"))
    with pytest.raises(BackendRefusalError, match="act_dtype=bfloat16"):
        get_backend("onnxruntime").check(compiled)
    with pytest.raises(PassOptionError, match="exclusive"):
        QuantizePass(bits=4, act_bits=8, act_dtype="bfloat16")


def test_bfloat16_rounding_is_held_to_the_jitter_calibrated_parity_bar(tied):
    """bfloat16 rounding at run time is discontinuous like act_quant: parity measures the reference against itself
    under rounding jitter and holds the session to that, and the jitter reaches the bfloat16 rounding."""
    from tokopt.backends.parity import check_parity
    from tokopt.optimizer.interpret.activations import rounding_jitter

    g = quantized(tied, bits=4)
    report = check_parity(g, CompiledSession(g, compile=False, max_len=128), label="compiled")
    assert report.passed and report.jitter_kl is not None and report.mean_kl is not None
    x, w = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)), torch.randn(16, 32)
    with rounding_jitter(rel=1e-3):
        moved = linear(x, w, None, None, "bfloat16")
    assert not torch.equal(moved, linear(x, w, None, None, "bfloat16"))
