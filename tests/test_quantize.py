"""The quantize pass: format numerics against their definition, GPTQ, the KV cache, options and errors."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from conftest import requires_smollm2
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import sample_ids, save_tiny_llama

import tokopt
from tokopt.cli import cli
from tokopt.errors import PassOptionError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.interpret.kv_quant import fake_quantize, quantize_kv
from tokopt.optimizer.ir.attrs import kv_cache_quant_attrs
from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.ir.verify import verify
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize, pack_codes, unpack_codes
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.quant.calibration import add_upper_gram, mirror_upper
from tokopt.passes.quant.gptq import gptq_quantize, output_error
from tokopt.passes.quant.rtn import quantize_rtn
from tokopt.passes.quant.weights import _drift
from tokopt.passes.quantize import QuantizePass
from tokopt.passes.registry import get_pass_class


# -- the format: codes, scales, packing ---------------------------------------------------
def test_rtn_symmetric_int4_codes_and_scales_match_the_definition():
    w = torch.tensor([[7.0, -3.4, 2.6, 0.49], [14.0, -14.0, 3.1, -0.9], [-8.0, 3.0, 1.4, -0.6]])
    q = quantize_rtn(w, bits=4, group_size=-1, symmetric=True, scale_dtype="float32")
    # scale = max(max / 7, -min / 8): the whole signed grid -8..7; code = round(w / scale) + 8
    assert q.scales.flatten().tolist() == [1.0, 2.0, 1.0]
    assert q.zero_points is None and q.group_size == 4 and q.bits == 4
    assert q.codes().tolist() == [[15, 5, 11, 8], [15, 1, 10, 8], [0, 11, 9, 7]]
    assert torch.equal(q.dequantize(), torch.tensor([[7.0, -3.0, 3.0, 0.0], [14.0, -14.0, 4.0, 0.0],
                                                     [-8.0, 3.0, 1.0, -1.0]]))


def test_rtn_asymmetric_codes_zero_points_and_groups():
    w = torch.tensor([[-1.0, 2.0, 0.44, 1.0, 0.0, 0.0, 3.0, 1.5]])
    q = quantize_rtn(w, bits=4, group_size=4, symmetric=False, scale_dtype="float32")
    # group 0: range [-1, 2] → scale 0.2, zero round(1 / 0.2) = 5; group 1: [0, 3] → scale 0.2, zero 0
    assert q.scales.shape == (1, 2) and torch.allclose(q.scales, torch.tensor([[0.2, 0.2]]))
    assert q.zero_points.tolist() == [[5, 0]]
    assert q.codes().tolist() == [[0, 15, 7, 10, 0, 0, 15, 8]]


def test_4bit_packing_puts_element_2j_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 3], [15, 0, 9]])
    packed = pack_codes(codes, 4)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0x03], [0x0F, 0x09]]
    assert unpack_codes(packed, 4, 3).tolist() == codes.tolist()


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 9), groups=st.integers(1, 4), gs=st.sampled_from([2, 8, 32]),
       bits=st.sampled_from([4, 8]), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_pack_round_trip_and_rounding_error_bound(out_f, groups, gs, bits, symmetric, seed):
    w = torch.randn(out_f, groups * gs, generator=torch.Generator().manual_seed(seed)) * 3
    q = quantize_rtn(w, bits=bits, group_size=gs, symmetric=symmetric, scale_dtype="float32")
    assert q.packed.shape == (out_f, groups * gs * bits // 8)
    assert torch.equal(unpack_codes(pack_codes(q.codes(), bits), bits, groups * gs), q.codes())
    assert int(q.codes().min()) >= 0 and int(q.codes().max()) < 2 ** bits
    # round to nearest on an unclipped grid: every element within half a step
    step = q.scales.float().repeat_interleave(gs, dim=1)
    assert bool(((w - q.dequantize()).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())


def test_nbytes_count_codes_scales_and_zero_points():
    w = torch.randn(16, 128)
    assert quantize_rtn(w, 4, 64, True, "float16").nbytes == 16 * 64 + 16 * 2 * 2
    assert quantize_rtn(w, 4, 64, False, "float16").nbytes == 16 * 64 + 16 * 2 * 2 + 16 * 2
    assert quantize_rtn(w, 8, -1, True, "float32").nbytes == 16 * 128 + 16 * 4


# -- GPTQ ----------------------------------------------------------------------------------
def _correlated_layer(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 64, generator=gen) @ torch.randn(64, 64, generator=gen) * 0.3
    x[:, :4] *= 8  # a few outlier channels, as in real transformer activations
    w = torch.randn(48, 64, generator=gen)
    return w, x.T @ x / x.shape[0]


@pytest.mark.parametrize("bits,group_size", [(4, 16), (4, -1), (8, -1)])
def test_gptq_beats_rtn_on_output_error(bits, group_size):
    w, h = _correlated_layer()
    rtn = quantize_rtn(w, bits, group_size, True, "float32")
    gptq = gptq_quantize(w, h, bits, group_size, True, "float32")
    assert output_error(w, gptq, h) < 0.7 * output_error(w, rtn, h)


def test_gptq_is_deterministic_and_keeps_contiguous_groups():
    w, h = _correlated_layer(1)
    a = gptq_quantize(w, h, 4, 16, False, act_order=True)
    b = gptq_quantize(w, h, 4, 16, False, act_order=True)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
    assert a.group_size == 16 and a.scales.shape == (48, 4) and a.zero_points.shape == (48, 4)
    # the stored grid reproduces the dequantized weight through the plain format definition
    zero, scale = a.zero_points.float().repeat_interleave(16, 1), a.scales.float().repeat_interleave(16, 1)
    manual = (a.codes().float() - zero) * scale
    assert torch.equal(manual, a.dequantize())


# -- the KV cache --------------------------------------------------------------------------
def test_kv_fake_quantize_error_bound_is_idempotent_and_token_local():
    x = torch.randn(2, 3, 10, 64, generator=torch.Generator().manual_seed(0))
    for bits, sym in ((8, True), (4, False)):
        y = fake_quantize(x, bits, 64, sym, "float32")
        step = (x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1) if sym
                else (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2 ** bits - 1))
        assert bool(((x - y).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all())
        assert torch.allclose(fake_quantize(y, bits, 64, sym, "float32"), y, atol=1e-6)
        # per-token scales: quantizing a prefix alone gives the same values (prefill == decode)
        assert torch.equal(fake_quantize(x[:, :, :4], bits, 64, sym, "float32"), y[:, :, :4])


def test_kv_cache_attrs_count_scale_bytes():
    a = kv_cache_quant_attrs(8, num_kv_heads=3, head_dim=64)
    assert a["dtype"] == "int8" and a["scale_bytes_per_token"] == 2 * 3 * 2
    a4 = kv_cache_quant_attrs(4, num_kv_heads=3, head_dim=64, group_size=32, symmetric=False)
    assert a4["dtype"] == "int4" and a4["scale_bytes_per_token"] == 2 * 3 * 2 * (2 + 1)
    k = torch.randn(1, 3, 5, 64)
    assert quantize_kv(k, k, {"dtype": "float32"})[0] is k


# -- the pass on a tiny llama ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tokopt.load(str(save_tiny_llama(tmp_path_factory.mktemp("q_tiny"))))


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return tokopt.load(str(save_tiny_llama(tmp_path_factory.mktemp("q_tied"), tie_word_embeddings=True)))


def _calib(n: int = 8, seq: int = 64) -> list[torch.Tensor]:
    return [sample_ids(1, seq, 128, seed=100 + i) for i in range(n)]


def _run(graph, **opts):
    p = QuantizePass(**opts)
    ctx = PassContext(calibration_batches=_calib())
    p.check(graph, ctx)
    result = p.run(graph, ctx)
    verify(result.graph, "quantize")
    return result


def test_registered_and_documented():
    cls = get_pass_class("quantize")
    assert cls is QuantizePass
    docs = {o["name"]: o for o in cls.describe()["options"]}
    assert {"bits", "group_size", "symmetric", "method", "include", "exclude", "embeddings", "lm_head",
            "kv_bits", "kv_group_size"} <= set(docs)
    assert all(o["doc"] for o in docs.values())


def test_int8_rtn_quantizes_every_linear_and_embedding(tiny):
    result = _run(tiny, bits=8, method="rtn")
    g = result.graph
    for node in g.nodes():
        if node.op in ("Linear", "Embedding"):
            assert isinstance(g.params[node.params["weight"]], QuantizedWeight), node.name
    assert all(not isinstance(w, QuantizedWeight) for w in tiny.params.values())  # the input graph is untouched
    assert static_metrics(g).weight_bytes <= 0.27 * static_metrics(tiny).weight_bytes
    ids = sample_ids(2, 16)
    base, out = ReferenceExecutor(tiny).forward(ids), ReferenceExecutor(g).forward(ids)
    assert (out - base).abs().max() < 0.05 * base.abs().max()
    assert result.changed and any("int8" in n for n in result.notes)


def test_include_exclude_patterns_select_nodes(tiny):
    g = _run(tiny, bits=4, group_size=32, method="rtn", include="layers.*.mlp.*", exclude="layers.0.*").graph
    quantized = {n.name for n in g.nodes() if n.op in ("Linear", "Embedding")
                 and isinstance(g.params[n.params["weight"]], QuantizedWeight)}
    assert quantized == {f"layers.{i}.mlp.{p}" for i in (1, 2, 3) for p in ("gate_proj", "up_proj", "down_proj")}


def test_tied_embedding_and_lm_head_share_one_quantized_tensor(tiny_tied):
    g = _run(tiny_tied, bits=4, group_size=32, method="rtn").graph
    emb, head = g.node("embed_tokens").params["weight"], g.node("lm_head").params["weight"]
    assert emb == head and isinstance(g.params[emb], QuantizedWeight)


def test_tied_weight_with_lm_head_excluded_is_untied(tiny_tied):
    result = _run(tiny_tied, bits=8, method="rtn", lm_head=False)
    g = result.graph
    emb, head = g.node("embed_tokens").params["weight"], g.node("lm_head").params["weight"]
    assert emb != head
    assert isinstance(g.params[emb], QuantizedWeight) and not isinstance(g.params[head], QuantizedWeight)
    assert any("untied" in n for n in result.notes)


def test_gptq_pass_is_reproducible_and_close(tiny):
    a = _run(tiny, bits=4, group_size=32, method="gptq").graph
    b = _run(tiny, bits=4, group_size=32, method="gptq").graph
    name = a.node("layers.2.mlp.down_proj").params["weight"]
    assert a.params[name].method == "gptq"
    assert torch.equal(a.params[name].packed, b.params[name].packed)
    ids = sample_ids(2, 16, 128, seed=7)  # the calibration text's distribution (token ids < 128)
    base = ReferenceExecutor(tiny).forward(ids).log_softmax(-1)
    rtn = ReferenceExecutor(_run(tiny, bits=4, group_size=32, method="rtn").graph).forward(ids).log_softmax(-1)
    gptq = ReferenceExecutor(a).forward(ids).log_softmax(-1)
    kl = lambda p: float((base.exp() * (base - p)).sum(-1).mean())  # noqa: E731
    assert kl(gptq) < kl(rtn)


@pytest.mark.parametrize("width", [3, 5, 64, 130])
def test_block_triangular_gram_is_the_symmetric_x_transpose_x(width):
    gen = torch.Generator().manual_seed(width)
    batches = [torch.randn(40, width, generator=gen) for _ in range(3)]
    h = torch.zeros(width, width)
    for x in batches:
        add_upper_gram(h, x)
    mirror_upper(h)
    every = torch.cat(batches).double()
    assert torch.equal(h, h.T)
    assert torch.allclose(h.double(), every.T @ every, rtol=1e-5, atol=1e-4)


def test_drift_correction_is_the_least_squares_fit_to_the_float_layer():
    torch.manual_seed(0)
    x = torch.randn(512, 24, dtype=torch.float64)  # the inputs the quantized model gives the layer
    x_float = x + 0.1 * torch.randn_like(x)  # the float model's inputs at the same tokens
    w = torch.randn(8, 24, dtype=torch.float64)
    h, cross = x.T @ x / len(x), x_float.T @ x / len(x)
    fitted = w + w @ _drift(h, cross, damp=0.0).double()
    best = torch.linalg.lstsq(x, x_float @ w.T).solution.T  # argmin |x W*^T - x_float W^T|
    assert torch.allclose(fitted, best, atol=1e-5)
    assert _drift(h, h, damp=0.01).abs().max() == 0  # undrifted inputs: the layer's own weight


def test_gptq_fitted_to_the_float_model_keeps_the_first_layer_and_lowers_the_kl(tiny):
    # layer 0 reads the float embedding; unrotated, so the comparison is of the fit alone
    opts = {"bits": 4, "group_size": 32, "method": "gptq", "embeddings": False, "rotate": False}
    plain, fitted = _run(tiny, **opts, fp_target=False).graph, _run(tiny, **opts).graph  # on by default
    first, later = (tiny.node(n).params["weight"] for n in ("layers.0.attn.q_proj", "layers.2.mlp.down_proj"))
    assert torch.equal(plain.params[first].packed, fitted.params[first].packed)  # its inputs have not drifted
    assert not torch.equal(plain.params[later].packed, fitted.params[later].packed)
    ids = sample_ids(2, 16, 128, seed=7)  # the calibration text's distribution (token ids < 128)
    base = ReferenceExecutor(tiny).forward(ids).log_softmax(-1)
    kl = lambda g: float((base.exp() * (base - ReferenceExecutor(g).forward(ids).log_softmax(-1))).sum(-1).mean())  # noqa: E731
    assert kl(fitted) < kl(plain)


def test_kv_int8_cache_is_read_quantized_in_prefill_and_decode(tiny):
    result = _run(tiny, weights=False, kv_bits=8)
    g = result.graph
    attn = g.nodes("Attention")[0].attrs["kv_cache"]
    assert attn["dtype"] == "int8" and attn["scale_bytes_per_token"] == 2 * 2 * 2
    assert static_metrics(g).kv_bytes_per_token < 0.3 * static_metrics(tiny).kv_bytes_per_token
    ex = ReferenceExecutor(g)
    ids = sample_ids(1, 24, seed=3)
    full = ex.forward(ids)
    assert not torch.allclose(full, ReferenceExecutor(tiny).forward(ids), atol=1e-6)  # the cache really is int8
    cache = ex.new_cache()
    steps = [ex.forward(ids[:, :16], cache)] + [ex.forward(ids[:, t:t + 1], cache) for t in range(16, 24)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-4


# -- options and errors --------------------------------------------------------------------
def test_bad_bits_lists_the_choices():
    with pytest.raises(PassOptionError, match="choose one of 8, 4"):
        QuantizePass(bits=5)


def test_group_size_that_does_not_divide_names_the_layer_and_what_works(tiny):
    with pytest.raises(PassOptionError, match=r"embed_tokens \(in_features 64\).*16, 32, 64, -1 \(per-channel\)"):
        QuantizePass(bits=4, group_size=128).check(tiny, PassContext())


def test_kv_group_size_must_divide_head_dim(tiny):
    with pytest.raises(PassOptionError, match="does not divide head_dim 16"):
        QuantizePass(weights=False, kv_bits=4, kv_group_size=12).check(tiny, PassContext())


def test_kv_bits_on_a_backend_without_quantized_kv_names_one_that_has_it(tiny, tmp_path):
    """Refused up front (a dry run), from the pass's preview, naming the node and a backend that can."""
    from tokopt.errors import BackendRefusalError
    from tokopt.jobs.optimize import optimize

    with pytest.raises(BackendRefusalError, match=r"after 'quantize:.*kv_bits=8'.*onnxruntime.*"
                                                  r"kv_cache\.dtype='int8'.*can: .*torch"):
        optimize(tiny, "quantize:weights=false,kv_bits=8", backend="onnxruntime", out=tmp_path / "o", dry_run=True)


@pytest.mark.parametrize("spec,message", [
    ("quantize:bits=5", "choose one of 8, 4"),
    ("quantize:bits=4,group_size=128", "group sizes that divide every selected layer"),
])
def test_cli_exits_2_on_bad_options(tmp_path, spec, message):
    model = save_tiny_llama(tmp_path / "m", layers=1)
    result = CliRunner().invoke(cli, ["optimize", str(model), "--passes", spec, "--dry-run"])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_cli_exits_2_on_kv_bits_for_a_backend_without_support(tmp_path):
    model = save_tiny_llama(tmp_path / "m", layers=1)
    result = CliRunner().invoke(cli, ["optimize", str(model), "--passes", "quantize:weights=false,kv_bits=8",
                                      "--backend", "onnxruntime", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "backends that can" in result.output and "torch" in result.output


# -- SmolLM2: the real model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_eval(smollm2_graph):
    from tokopt.optimizer import corpus

    ids = corpus.tokenize(corpus.default_eval_text(), corpus.tokenizer_for(smollm2_graph),
                          smollm2_graph.meta.vocab_size)
    return corpus.fixed_batches(ids, 2, 128, "eval")


def _ppl(graph, batches) -> float:
    logits = ReferenceExecutor(graph).forward(batches)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batches[:, 1:].flatten())
    return math.exp(float(nll))


@requires_smollm2
@pytest.mark.smollm2
def test_smollm2_int8_and_kv_int8_budgets(smollm2_graph, smollm2_eval):
    base = _ppl(smollm2_graph, smollm2_eval)
    m0 = static_metrics(smollm2_graph)
    q = QuantizePass(bits=8, kv_bits=8).run(smollm2_graph, PassContext()).graph
    m = static_metrics(q)
    assert m.weight_bytes <= 0.27 * m0.weight_bytes
    assert m.kv_bytes_per_token <= 0.27 * m0.kv_bytes_per_token
    assert _ppl(q, smollm2_eval) <= base * 1.01  # the 8×512 benchmark holds each to +0.5 %


@requires_smollm2
@pytest.mark.smollm2
def test_smollm2_gptq_layer_error_below_rtn(smollm2_graph, smollm2_eval):
    """Calibrated on the calibration text, judged on the eval text: GPTQ's layer outputs stay closer."""
    layer = "layers.3.attn.q_proj"
    ctx = PassContext(calibration_batches=None)
    opts = dict(bits=4, group_size=64, include=layer, calibration_samples=8, calibration_seq_len=512)
    gptq = QuantizePass(method="gptq", rotate=False, **opts).run(smollm2_graph, ctx).graph  # unrotated: same weight
    rtn = QuantizePass(method="rtn", **opts).run(smollm2_graph, ctx).graph
    x = ctx.capture_inputs(smollm2_graph, {layer}, [smollm2_eval])[layer][0].flatten(0, 1)
    pname = smollm2_graph.node(layer).params["weight"]
    ref = x @ materialize(smollm2_graph.params[pname]).T
    err = {k: float(((x @ g.params[pname].dequantize().T) - ref).pow(2).mean()) for k, g in
           (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] < 0.6 * err["rtn"], err


def test_gptq_by_slabs_of_rows_is_gptq_on_the_whole(monkeypatch):
    """Rows are independent given the Hessian: sweeping 5 rows at a time changes no code."""
    from tokopt.passes.quant import gptq

    w, h = _correlated_layer(2)
    whole = gptq_quantize(w, h, 4, 16, False)
    monkeypatch.setattr(gptq, "GPTQ_SLAB", 5 * w.shape[1])
    slabs = gptq_quantize(w, h, 4, 16, False)
    assert torch.equal(whole.packed, slabs.packed) and torch.equal(whole.scales, slabs.scales)
    assert torch.equal(whole.zero_points, slabs.zero_points)
    stored = gptq_quantize(w.to(torch.bfloat16), h, 4, 16, False)  # a bf16 checkpoint's tensor, as stored
    assert torch.equal(stored.packed, gptq_quantize(w.to(torch.bfloat16).float(), h, 4, 16, False).packed)


def test_gptq_with_a_shared_factorization_is_gptq_on_the_hessian():
    """q/k/v share one ``inverse_hessian``: each weight's codes are those its own Hessian gives."""
    from tokopt.passes.quant.gptq import inverse_hessian

    w, h = _correlated_layer(3)
    shared = inverse_hessian(h, damp=0.01, act_order=True)
    for rows in (w, w[:20] * 2):
        assert torch.equal(gptq_quantize(rows, shared, 4, 16, True).packed, gptq_quantize(rows, h, 4, 16, True).packed)


def test_calibration_takes_the_whole_sequences_a_short_text_holds(small_llama):
    """Calibration defaults to 32 × 512 tokens; a shorter text calibrates on the sequences it holds (said in the
    description), and one too short for a single sequence is refused by name."""
    from tokopt.measure.quality import EvalConfig, build_calibration
    from tokopt.optimizer import corpus

    graph = tokopt.load(str(small_llama))
    tok = corpus.tokenizer_for(graph)
    assert EvalConfig().calib_sequences == 32
    text = corpus.TextSource("short.txt", " ".join(f"word{i % 50}" for i in range(3000)))
    available = len(corpus.tokenize(text, tok, graph.meta.vocab_size))
    batches, info = build_calibration(text, EvalConfig(calib_sequences=1000, calib_seq_len=64), tok,
                                      graph.meta.vocab_size)
    assert len(batches) == info["sequences"] == available // 64 < 1000  # the report says how many were used
    assert all(b.shape == (1, 64) for b in batches)
    with pytest.raises(corpus.CorpusError, match="short.txt"):
        build_calibration(text, EvalConfig(calib_seq_len=available + 1), tok, graph.meta.vocab_size)
