"""Low-bit weights in the compiled session: ``act_dtype=bfloat16`` Linears on torch's low-bit CPU kernels.

The IR defines ``act_dtype=bfloat16`` (input and product rounded to bfloat16, float32 accumulation,
the exact dequantized weight); the reference executor computes that definition, and the compiled
session runs the same Linears on ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` — or on
dequantized weights where no kernel computes the stored format exactly — with the reference's logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tokopt
from tokopt.backends.registry import get_backend
from tokopt.backends.torch.compiled import CompiledSession
from tokopt.backends.torch.lowbit import kernel_for
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


@pytest.mark.parametrize("opts, kernel", [({"bits": 4}, "int4pack"), ({"bits": 8}, "int8pack"),
                                         ({"bits": 4, "symmetric": False}, "dequantized")])
def test_the_compiled_session_runs_low_bit_kernels_with_the_reference_logits(tied, opts, kernel):
    g = quantized(tied, **opts)
    linears = g.nodes("Linear")
    assert {n.attrs["act_dtype"] for n in linears} == {"bfloat16"}
    session = CompiledSession(g, compile=True, max_len=64)
    assert dict(session._weights.kernels) == {kernel: len(linears)}
    ids = sample_ids(2, 12)
    got, expected = prefill_and_decode(session, ids), prefill_and_decode(ReferenceExecutor(g), ids)
    assert torch.allclose(got, expected, atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


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

    assert kernel_for(quantize_rtn(w, 4, 32, True, "bfloat16")) == "int4pack"
    assert kernel_for(quantize_rtn(w, 4, 32, True, "float16")) is None  # the kernel reads bfloat16 scales
    assert kernel_for(quantize_rtn(w, 4, 32, False, "bfloat16")) is None  # zero points: not exact in bf16
    assert kernel_for(quantize_rtn(w, 8, -1, True, "bfloat16")) == "int8pack"
    assert kernel_for(quantize_rtn(w, 8, 32, True, "bfloat16")) is None  # int8pack is per-channel
    assert kernel_for(quantize_rtn(torch.randn(24, 64), 4, 32, True, "bfloat16")) is None  # rows tile by 16
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
