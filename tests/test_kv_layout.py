"""kv-layout and the reference KV cache: every layout/storage/window gives the logits of full
recomputation, memory follows the policy, and the memory model matches the real cache."""

from __future__ import annotations

import pytest
import torch

import tokopt
from tokopt.errors import KVCacheFullError, PassOptionError, UnsupportedOpError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.interpret.kv_cache import CachePolicy, KVCache
from tokopt.optimizer.ir.attrs import kv_cache_quant_attrs
from tokopt.optimizer.ir.kv_memory import reserved_kv_bytes
from tokopt.optimizer.ir.verify import verify
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.kv_layout import KVLayout
from tokopt.passes.registry import get_pass_class

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tokopt.load(tiny_model_dir("llama")[0])


def with_cache(graph, window=None, sinks=0, **kv):
    g = graph.copy()
    for node in g.nodes("Attention"):
        node.attrs["window"], node.attrs["sinks"] = window, sinks
        node.attrs["kv_cache"] = {**node.attrs["kv_cache"], **kv}
    verify(g, "test")
    return g


def chunked(executor, ids, chunks):
    cache, outs, start, sizes = executor.new_cache(), [], 0, []
    for n in chunks:
        outs.append(executor.forward(ids[:, start:start + n], cache))
        start += n
        sizes.append(cache.nbytes())
    return torch.cat(outs, dim=1), sizes


STORES = [("dynamic", {}), ("static", {"max_len": 64}), ("paged", {"block_size": 4})]


@pytest.mark.parametrize("storage,extra", STORES, ids=[s for s, _ in STORES])
@pytest.mark.parametrize("layout", ["BNSH", "BSNH"])
@pytest.mark.parametrize("window,sinks", [(None, 0), (8, 0), (5, 3)])
def test_cache_matches_full_recompute(llama, storage, extra, layout, window, sinks):
    g = with_cache(llama, window, sinks, storage=storage, layout=layout, **extra)
    ex = ReferenceExecutor(g)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    full = ex.forward(ids)
    for chunks in ([1] * 40, [7, 1, 1, 13, 1, 17]):  # decode and mixed chunks, past the window
        got, _ = chunked(ex, ids, chunks)
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


KV_DTYPES = {"float32": None, "int8": (8, None, True), "int4-asym-g8": (4, 8, False)}


def kv_quant(graph, spec) -> dict:
    """The ``kv_cache`` entries of a quantized cache (bits, group size, symmetric) for ``graph``'s attention."""
    if spec is None:
        return {}
    a = graph.nodes("Attention")[0].attrs
    bits, group, symmetric = spec
    return kv_cache_quant_attrs(bits, a["num_kv_heads"], a["head_dim"], group, symmetric)


@pytest.mark.parametrize("kv", KV_DTYPES)
@pytest.mark.parametrize("storage,extra", STORES, ids=[s for s, _ in STORES])
def test_reserved_bytes_model_matches_the_cache(llama, storage, extra, kv):
    """The cache holds what the IR says: an int8/int4 cache's bytes are its codes and scales, nothing in fp32."""
    for window, sinks in ((None, 0), (8, 2)):
        g = with_cache(llama, window, sinks, storage=storage, **extra, **kv_quant(llama, KV_DTYPES[kv]))
        ex = ReferenceExecutor(g)
        ids = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(2))
        for length in (1, 9, 30):
            _, sizes = chunked(ex, ids[:, :length], [1] * length)
            assert sizes[-1] == reserved_kv_bytes(g, [length] * 3), (window, length)


def test_mixed_lengths_paged_reserves_least(llama):
    lengths = [5, 60, 17, 3]
    static = reserved_kv_bytes(with_cache(llama, storage="static", max_len=64), lengths)
    dynamic = reserved_kv_bytes(with_cache(llama), lengths)
    paged = reserved_kv_bytes(with_cache(llama, storage="paged", block_size=4), lengths)
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv heads * head_dim * fp32
    assert static == 4 * 64 * per_token
    assert dynamic == 4 * 60 * per_token
    assert paged == (8 + 60 + 20 + 4) * per_token


def test_static_cache_refuses_overflow(llama):
    g = with_cache(llama, storage="static", max_len=8)
    ex = ReferenceExecutor(g)
    cache = ex.new_cache()
    ex.forward(torch.arange(8)[None], cache)
    with pytest.raises(KVCacheFullError, match="max_len=8"):
        ex.forward(torch.tensor([[3]]), cache)


def test_windowed_static_cache_never_overflows(llama):
    g = with_cache(llama, window=4, sinks=1, storage="static")
    cache = ReferenceExecutor(g).new_cache()
    ex = ReferenceExecutor(g)
    for t in range(20):
        ex.forward(torch.tensor([[t + 3]]), cache)
    assert set(cache.tokens().values()) == {5}


def test_policy_refuses_what_it_cannot_honour():
    with pytest.raises(UnsupportedOpError, match="layout"):
        CachePolicy.from_attrs({"kv_cache": {"layout": "SBNH"}})
    with pytest.raises(UnsupportedOpError, match="block_size"):
        CachePolicy.from_attrs({"kv_cache": {"storage": "paged"}})
    with pytest.raises(UnsupportedOpError, match="max_len"):
        CachePolicy.from_attrs({"kv_cache": {"storage": "static"}})
    assert KVCache().layer("x").policy == CachePolicy()  # no attributes: the growing cache


def test_pass_records_layout_and_keeps_numerics(llama):
    res = get_pass_class("kv-layout")(layout="BSNH", storage="paged", block_size=8).run(llama, PassContext())
    assert res.changed
    verify(res.graph, "kv-layout")
    for node in res.graph.nodes("Attention"):
        assert node.attrs["kv_cache"]["layout"] == "BSNH"
        assert node.attrs["kv_cache"]["storage"] == "paged" and node.attrs["kv_cache"]["block_size"] == 8
    assert llama.nodes("Attention")[0].attrs["kv_cache"]["storage"] == "dynamic"  # input graph untouched
    assert any("reserved KV bytes" in n for n in res.notes)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    ex0, ex1 = ReferenceExecutor(llama), ReferenceExecutor(res.graph)
    torch.testing.assert_close(chunked(ex1, ids, [10] + [1] * 14)[0], ex0.forward(ids), rtol=1e-5, atol=1e-5)


def test_static_default_max_len_is_model_max_positions(llama):
    res = KVLayout(storage="static").run(llama, PassContext())
    assert {n.attrs["kv_cache"]["max_len"] for n in res.graph.nodes("Attention")} == {llama.meta.max_positions}
    again = KVLayout(storage="static").run(res.graph, PassContext())
    assert not again.changed


def test_options_are_checked():
    with pytest.raises(PassOptionError, match="layout"):
        KVLayout()
    with pytest.raises(PassOptionError, match="block_size only"):
        KVLayout(storage="static", block_size=16)
    with pytest.raises(PassOptionError, match="max_len only"):
        KVLayout(storage="paged", max_len=16)
    with pytest.raises(PassOptionError, match="one of"):
        KVLayout(layout="NHWC")


def _converted(llama):
    from tokopt.passes.gqa import GroupedQueryAttention
    from tokopt.passes.sparse_attention import SparseAttention

    ctx = PassContext(calibration_batches=[torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(5))])
    return {
        "sparse window=6,sinks=2": SparseAttention(window=6, sinks=2).run(llama, ctx).graph,
        "sparse window=6,sinks=0": SparseAttention(window=6, sinks=0).run(llama, ctx).graph,
        "gqa calibrated 2->1": GroupedQueryAttention(num_kv_heads=1, calib_seq_len=64).run(llama, ctx).graph,
        "kv-layout static": KVLayout(storage="static", max_len=64).run(llama, ctx).graph,
        "kv-layout paged BSNH": KVLayout(storage="paged", layout="BSNH").run(llama, ctx).graph,
    }


@pytest.mark.parametrize("backend_name", ["torch", "onnxruntime"])
def test_converted_models_match_every_backend_that_accepts_them(llama, backend_name, tmp_path):
    """Each attention pass's output lowers and matches the reference, decoding past the window — or is refused."""
    from tokopt.backends.parity import check_parity
    from tokopt.backends.registry import get_backend
    from tokopt.errors import BackendRefusalError

    backend = get_backend(backend_name)
    ok, why = backend.availability()
    if not ok:
        pytest.skip(why)
    accepted = 0
    for label, graph in _converted(llama).items():
        try:
            backend.check(graph)
        except BackendRefusalError as exc:
            assert "layout" in str(exc) or "storage" in str(exc) or "sinks" in str(exc), exc
            continue
        session = backend.load(backend.lower(graph, tmp_path / label.replace(" ", "_")).path)
        tokens = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(0))
        report = check_parity(graph, session, tokens=tokens, decode_steps=8, raise_on_failure=False)
        assert report.passed, (label, report)
        accepted += 1
    assert accepted >= 4


def test_static_max_len_must_hold_the_window(llama):
    from tokopt.errors import PreconditionError
    from tokopt.passes.sparse_attention import SparseAttention

    windowed = SparseAttention(window=16, sinks=4).run(llama, PassContext()).graph
    with pytest.raises(PreconditionError, match="max_len=8 cannot hold"):
        KVLayout(storage="static", max_len=8).run(windowed, PassContext())
    with pytest.raises(UnsupportedOpError, match="cannot hold"):
        CachePolicy.from_attrs({"window": 16, "sinks": 4, "kv_cache": {"storage": "static", "max_len": 8}})
    g = KVLayout(storage="static").run(windowed, PassContext()).graph
    assert reserved_kv_bytes(g, [3, 100]) == reserved_kv_bytes(g, [1000, 1000])  # 2 × (sinks + window) slots
