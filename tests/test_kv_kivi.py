"""KIVI int4 KV cache: per-channel keys over token blocks, per-token values, the newest tokens in full precision.

The codec against its definition, the read rule, cached prefill + decode (every storage) against the
whole-sequence forward, the compiled session against the reference, the schema's refusals, and the
stores' bytes against the cost model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import sample_ids, save_tiny_llama

import tokopt
from tokopt.backends.torch.compiled import CompiledSession
from tokopt.errors import BackendRefusalError, PassOptionError, UnsupportedOpError, VerificationError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.interpret.kv_cache import CachePolicy
from tokopt.optimizer.interpret.kv_quant import IntKVCodec, KiviKVCodec, kv_codec, kv_view
from tokopt.optimizer.ir.attrs import check_kv_cache, kivi_quantized_below, kv_cache_quant_attrs
from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.ir.kv_memory import reserved_kv_bytes
from tokopt.optimizer.ir.verify import verify
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.kv_layout import KVLayout
from tokopt.passes.quantize import QuantizePass
from tokopt.passes.sparse_attention import SparseAttention

G, R = 8, 5  # small blocks so that a 45-token sequence crosses several


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tokopt.load(str(save_tiny_llama(tmp_path_factory.mktemp("kivi_tiny"), layers=2)))


def kivi(graph, **opts):
    return QuantizePass(weights=False, kv_bits=4, **opts).run(graph, PassContext()).graph


def with_storage(graph, storage: str):
    if storage == "dynamic":
        return graph
    layout = KVLayout(storage="static", max_len=64) if storage == "static" else \
        KVLayout(storage="paged", block_size=5, layout="BSNH")
    return layout.run(graph, PassContext()).graph


# -- the codec and the read rule -----------------------------------------------------------------
def test_keys_are_quantized_per_channel_over_a_token_block_as_defined():
    """Hand-computed: channel 0 spans 0 … 7.5 (scale 0.5, min 0), channel 1 is constant (scale 0 -> 1, min 2)."""
    k = torch.tensor([[0.0, 2.0], [1.5, 2.0], [3.0, 2.0], [7.5, 2.0]]).reshape(1, 1, 4, 2)
    codec = KiviKVCodec(bits=4, token_group=4)
    codes, params = codec.encode_keys(k)
    unpacked = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    assert unpacked.reshape(4, 2).tolist() == [[0, 0], [3, 0], [6, 0], [15, 0]]
    # the block's fp16 (scale, scale, min, min) = 8 bytes, spread as 2 bytes on each of its 4 token rows
    assert params.shape == (1, 1, 4, 2) and params.dtype == torch.uint8
    grid = params.reshape(-1).view(torch.float16).tolist()
    assert grid == [0.5, 1.0, 0.0, 2.0]
    assert torch.equal(codec.decode_keys(codes, params, torch.float32), k)


def test_key_grid_matches_its_formula_and_values_stay_per_token():
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 24, 16), torch.randn(2, 3, 24, 16)
    codec = KiviKVCodec(bits=4, group_size=8, token_group=8)
    got = codec.decode_keys(*codec.encode_keys(k), torch.float32)
    x = k.reshape(2, 3, 3, 8, 16)
    lo, hi = x.amin(3, keepdim=True), x.amax(3, keepdim=True)
    scale = ((hi - lo) / 15).half().float()
    low = lo.half().float()
    expected = (torch.clamp(torch.round((x - low) / scale), 0, 15) * scale + low).reshape(k.shape)
    assert torch.equal(got, expected)
    assert (got - k).abs().max() <= scale.max() / 2 + 1e-3
    values = IntKVCodec(4, 8, False)
    assert torch.equal(codec.decode_kv(codec.encode_kv(k, v), torch.float32)[1],
                       values.decode(values.encode(v), torch.float32))


def test_read_rule():
    assert [kivi_quantized_below(t, 4, 0) for t in range(10)] == [0, 0, 0, 4, 4, 4, 4, 8, 8, 8]
    assert [kivi_quantized_below(t, 4, 3) for t in range(12)] == [0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    t = torch.arange(12)
    assert kivi_quantized_below(t, 4, 3).tolist() == [kivi_quantized_below(i, 4, 3) for i in range(12)]


def test_whole_sequence_view_holds_both_copies_and_the_mask_picks_one():
    from tokopt.optimizer.interpret.kernels import attention_mask

    attrs = {"kv_cache": kv_cache_quant_attrs(4, 1, 16, None, False, "float16", "channel", 4, 2)}
    k = torch.randn(1, 1, 10, 16)
    kk, _, pos, quantized = kv_view(k, k, torch.arange(10), attrs["kv_cache"])
    assert kk.shape[2] == 20 and quantized.sum() == 10
    mask = attention_mask(torch.arange(10), pos, attrs, quantized)
    assert torch.equal(mask.sum(-1), torch.arange(1, 11))  # each visible position once
    picked_quantized = (mask & quantized[None, :]).sum(-1)
    assert picked_quantized.tolist() == [kivi_quantized_below(t, 4, 2) for t in range(10)]


# -- cached decode == whole-sequence forward ------------------------------------------------------
@pytest.mark.parametrize("storage", ["dynamic", "static", "paged"])
@pytest.mark.parametrize("residual", [0, R])
def test_cached_prefill_and_decode_equal_the_whole_sequence(tiny, one_thread, storage, residual):
    g = with_storage(kivi(tiny, kv_token_group=G, kv_residual=residual), storage)
    verify(g, "kivi")
    ids = sample_ids(2, 45, seed=3)
    ex = ReferenceExecutor(g)
    whole = ex.forward(ids)
    cache = ex.new_cache()
    # a prompt ending mid-block, one-token steps across block boundaries, a chunk spanning several blocks
    outs = [ex.forward(ids[:, :11], cache)] + [ex.forward(ids[:, t:t + 1], cache) for t in range(11, 30)]
    outs.append(ex.forward(ids[:, 30:], cache))
    assert float((torch.cat(outs, dim=1) - whole).abs().max()) <= 1e-5
    # it really is quantized: neither the float cache nor every key read dequantized
    assert float((whole - ReferenceExecutor(tiny).forward(ids)).abs().max()) > 1e-3
    per_token = ReferenceExecutor(kivi(tiny, kv_key_axis="token", kv_group_size=8)).forward(ids)
    assert float((whole - per_token).abs().max()) > 1e-3


def test_compiled_session_matches_the_reference_without_recompiling(tiny, one_thread):
    from torch._dynamo.utils import counters

    g = kivi(tiny, kv_token_group=G, kv_residual=R)
    ids = sample_ids(2, 45, seed=5)
    expected = ReferenceExecutor(g).forward(ids)
    session = CompiledSession(g, compile=True, max_len=64)
    cache = session.new_cache()
    outs = [session.forward(ids[:, :11], cache), session.forward(ids[:, 11:12], cache)]
    graphs = counters["stats"]["unique_graphs"]
    outs += [session.forward(ids[:, t:t + 1], cache) for t in range(12, 45)]
    assert counters["stats"]["unique_graphs"] == graphs
    assert float((torch.cat(outs, dim=1) - expected).abs().max()) <= 1e-4
    assert session.kv_nbytes(cache) == reserved_kv_bytes(g, [64, 64])  # 2 x max_len slots, plus 2 rings


# -- memory: the stores hold what the cost model counts --------------------------------------------
@pytest.mark.parametrize("storage", ["dynamic", "static", "paged"])
def test_store_bytes_equal_the_cost_model(tiny, storage):
    g = with_storage(kivi(tiny, kv_token_group=G, kv_residual=R), storage)
    for n in (1, 7, 13, 40):
        ex = ReferenceExecutor(g)
        cache = ex.new_cache()
        ex.forward(sample_ids(1, n), cache)
        assert cache.nbytes() == reserved_kv_bytes(g, [n]), (storage, n)


def test_bytes_per_token_count_codes_and_spread_block_scales():
    # SmolLM2's shape: 3 KV heads of 64 dims, G = 64, values per 32 dims
    a = kv_cache_quant_attrs(4, 3, 64, 32, False, "float16", "channel", 64, 0)
    keys = 3 * (2 * 64 * 2) // 64  # fp16 scale + min per channel per 64 tokens
    values = 3 * 2 * (2 + 1)  # fp16 scale + uint8 zero per 32 dims per token
    assert a["scale_bytes_per_token"] == keys + values == 30
    # a block whose scales do not split evenly is padded, and the padding is counted
    assert kv_cache_quant_attrs(4, 1, 48, None, False, "float16", "channel", 128, 0)["scale_bytes_per_token"] \
        == 2 + 3
    attrs = {"num_kv_heads": 3, "head_dim": 64, "kv_cache": a}
    from tokopt.optimizer.ir.ops import kv_bytes_per_token

    assert kv_bytes_per_token(attrs) == 2 * 3 * 64 * 0.5 + 30


# -- the schema, the pass, the refusals -------------------------------------------------------------
def _attn(**quant):
    kv = kv_cache_quant_attrs(4, 2, 16, None, False, "float16", "channel", 8, 0)
    kv["quant"].update(quant)
    return {"head_dim": 16, "num_kv_heads": 2, "kv_cache": kv}


@pytest.mark.parametrize("attrs,message", [
    (_attn(key_axis="heads"), "key_axis 'heads'"),
    (_attn(token_group=0), "token_group 0"),
    (_attn(token_group=True), "token_group True"),
    (_attn(residual=-1), "residual -1"),
    (_attn(token_group=16), "scale_bytes_per_token"),
    ({**_attn(), "window": 4}, "with window=4"),
    ({"head_dim": 16, "num_kv_heads": 2, "kv_cache": {**kv_cache_quant_attrs(4, 2, 16),
                                                      "quant": {**kv_cache_quant_attrs(4, 2, 16)["quant"],
                                                                "token_group": 8}}}, "belong to key_axis='channel'"),
])
def test_schema_rejects_malformed_kivi_attrs(attrs, message):
    problems = check_kv_cache(attrs)
    assert any(message in p for p in problems), problems


def test_verifier_rejects_a_bad_kivi_graph(tiny):
    g = kivi(tiny)
    node = g.nodes("Attention")[0]
    node.attrs["kv_cache"] = copy.deepcopy(node.attrs["kv_cache"])
    node.attrs["kv_cache"]["quant"]["residual"] = -3
    with pytest.raises(VerificationError, match="residual -3"):
        verify(g, "edited")


def test_int4_defaults_to_kivi_and_windowed_layers_keep_per_token_keys(tiny):
    g = kivi(tiny)
    assert {n.attrs["kv_cache"]["quant"]["key_axis"] for n in g.nodes("Attention")} == {"channel"}
    assert isinstance(kv_codec(g.nodes("Attention")[0].attrs["kv_cache"]), KiviKVCodec)
    # 2 layers x (codes 2*2*16/2 + keys' fp16 scale/min 2*ceil(2*16*2/32) + values' scale/zero per head 2*3)
    assert static_metrics(g).kv_bytes_per_token == 2 * (32 + 4 + 6)
    int8 = QuantizePass(weights=False, kv_bits=8).run(tiny, PassContext()).graph
    assert "key_axis" not in int8.nodes("Attention")[0].attrs["kv_cache"]["quant"]
    windowed = SparseAttention(window=6, sinks=1, layers=[0]).run(tiny, PassContext()).graph
    axes = [n.attrs["kv_cache"]["quant"].get("key_axis") for n in kivi(windowed).nodes("Attention")]
    assert axes == [None, "channel"]


def test_kivi_with_a_window_is_refused_by_name(tiny):
    windowed = SparseAttention(window=6, sinks=1).run(tiny, PassContext()).graph
    with pytest.raises(PassOptionError, match=r"kv_key_axis=channel .*\(window=6\)"):
        QuantizePass(weights=False, kv_bits=4, kv_key_axis="channel").check(windowed, PassContext())
    attrs = dict(kivi(tiny).nodes("Attention")[0].attrs, window=6)
    with pytest.raises(UnsupportedOpError, match="KIVI cache .* window=6"):
        CachePolicy.from_attrs(attrs)


def test_kivi_options_need_per_channel_keys(tiny):
    with pytest.raises(PassOptionError, match="kv_token_group need kv_bits"):
        QuantizePass(kv_token_group=64)
    with pytest.raises(PassOptionError, match="no layer gets per-channel keys"):
        QuantizePass(weights=False, kv_bits=8, kv_residual=32).check(tiny, PassContext())


def test_onnxruntime_still_refuses_the_kivi_cache_by_name(tiny, tmp_path):
    from tokopt.jobs.optimize import optimize

    with pytest.raises(BackendRefusalError, match=r"kv_cache\.dtype='int4'"):
        optimize(tiny, "quantize:weights=false,kv_bits=4", backend="onnxruntime", out=tmp_path / "o", dry_run=True)
