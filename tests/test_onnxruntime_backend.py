"""The onnxruntime backend against the reference executor: every architecture, both attention
lowerings, quantized weights, every built-in pass, the artifact directory and onnxruntime-genai."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from conftest import ARCHITECTURES  # noqa: E402

import tokopt  # noqa: E402
from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend  # noqa: E402
from tokopt.backends.onnxruntime.external_data import write_model  # noqa: E402
from tokopt.backends.onnxruntime.lower import LoweringOptions, lower_graph  # noqa: E402
from tokopt.backends.onnxruntime.ops.attention import gqa_unsupported_reason  # noqa: E402
from tokopt.backends.onnxruntime.session import OnnxRuntimeSession  # noqa: E402
from tokopt.backends.parity import check_parity  # noqa: E402
from tokopt.errors import BackendRefusalError, ParityError, UnsupportedOpError  # noqa: E402
from tokopt.optimizer.interpret import ReferenceExecutor  # noqa: E402
from tokopt.optimizer.pass_api import PassContext  # noqa: E402

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


def _ids(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lowered_session(graph, tmp_path: Path, **options) -> tuple[OnnxRuntimeSession, str]:
    ctx = lower_graph(graph, LoweringOptions(**options))
    write_model(ctx.b, tmp_path / "model.onnx")
    return OnnxRuntimeSession(tmp_path / "model.onnx", threads=1), ctx.attention_mode


def assert_parity(graph, session, **kwargs):
    report = check_parity(graph, session, tokens=_ids(graph.meta.vocab_size), decode_steps=4, **kwargs)
    assert report.passed
    return report


@pytest.fixture(scope="module")
def tiny_graph(tiny_model_dir):
    graphs = {}

    def get(arch: str):
        if arch not in graphs:
            graphs[arch] = tokopt.load(str(tiny_model_dir(arch)[0]))
        return graphs[arch]

    return get


# -- parity per architecture -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attention", ["auto", "decomposed"])
def test_fp32_parity_every_architecture(arch, attention, tiny_graph, tmp_path):
    """Prefill (batch 2, 12 tokens: past mistral's window of 8) then 4 decode steps, max |diff| <= 1e-3."""
    session, mode = lowered_session(tiny_graph(arch), tmp_path, attention=attention)
    # a window (a ring, not GQA's buffer), sink logits, partial rotary: what GroupQueryAttention cannot express
    misfit = [why for n in tiny_graph(arch).nodes("Attention") if (why := gqa_unsupported_reason(n))]
    assert mode == ("gqa" if attention == "auto" and not misfit else "decomposed")
    report = assert_parity(tiny_graph(arch), session)
    assert report.max_abs_diff <= 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_standard_ops_without_contrib_norms(arch, tiny_graph, tmp_path):
    session, _ = lowered_session(tiny_graph(arch), tmp_path, attention="decomposed", fused_norms=False,
                                 fuse_qkv=False)
    assert_parity(tiny_graph(arch), session)


def test_chunked_prefill_batch1(tiny_graph, tmp_path):
    """A multi-token step after a cached prefix (the shared GQA buffer appends in place)."""
    graph = tiny_graph("mistral")
    session, _ = lowered_session(graph, tmp_path)
    ref = ReferenceExecutor(graph)
    ids = _ids(graph.meta.vocab_size, batch=1, seq=20)
    rc, oc = ref.new_cache(), session.new_cache(1)
    for chunk in (ids[:, :5], ids[:, 5:13], ids[:, 13:14], ids[:, 14:]):
        assert (ref.forward(chunk, rc) - session.forward(chunk, oc)).abs().max() <= 1e-3


def test_generate_matches_reference(tiny_graph, tmp_path):
    graph = tiny_graph("qwen3")
    session, _ = lowered_session(graph, tmp_path)
    ids = _ids(graph.meta.vocab_size, batch=1, seq=6)
    ref = ReferenceExecutor(graph)
    assert torch.equal(session.generate(ids, 10), ref.generate(ids, 10))


# -- attributes GroupQueryAttention cannot express ----------------------------------------------
def _with_sinks(graph, window: int = 4, sinks: int = 2):
    g = graph.copy()
    for node in g.nodes("Attention"):
        node.attrs["window"], node.attrs["sinks"] = window, sinks
    return g


def test_sinks_lowered_with_standard_ops(tiny_graph, tmp_path):
    graph = _with_sinks(tiny_graph("llama"))
    session, mode = lowered_session(graph, tmp_path)
    assert mode == "decomposed"
    assert_parity(graph, session)


def test_forcing_gqa_on_sinks_is_refused(tiny_graph):
    with pytest.raises(UnsupportedOpError, match="sink"):
        lower_graph(_with_sinks(tiny_graph("llama")), LoweringOptions(attention="gqa"))


def test_softcap(tiny_graph, tmp_path):
    graph = tiny_graph("llama").copy()
    for node in graph.nodes("Attention"):
        node.attrs["softcap"] = 3.0
    for attention in ("auto", "decomposed"):
        session, _ = lowered_session(graph, tmp_path / attention, attention=attention)
        assert_parity(graph, session)


@pytest.mark.parametrize("change, match", [
    ({"dtype": "int8"}, "kv_cache.dtype"),
    ({"storage": "paged", "block_size": 16}, "paged"),
    ({"layout": "BSNH"}, "layout"),
])
def test_check_refuses_what_it_cannot_express(change, match, tiny_graph):
    graph = tiny_graph("llama").copy()
    for node in graph.nodes("Attention"):
        node.attrs["kv_cache"] = {**node.attrs["kv_cache"], **change}
    with pytest.raises(BackendRefusalError, match=match):
        OnnxRuntimeBackend().check(graph)


def test_capabilities():
    caps = OnnxRuntimeBackend().capabilities().as_dict()
    assert caps["kv_dtypes"] == ["float32"]
    assert caps["window"] and caps["sinks"]
    assert caps["weight_bits"] == [4, 8]


# -- quantized weights (MatMulNBits) --------------------------------------------------------------
def _quantize(graph, **opts):
    from tokopt.passes.quantize import QuantizePass

    return QuantizePass(method="rtn", **opts).run(graph, PassContext()).graph


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, 16, False), (8, 32, True), (8, 16, False),
                                                     (8, -1, True), (8, -1, False), (4, -1, False)])
def test_matmulnbits_exact_at_fp32_accuracy(bits, group, symmetric, tiny_graph, tmp_path):
    """Without act_quant, MatMulNBits runs accuracy level 0 on the reference's codes: logits agree to 1e-3.

    Per-channel groups (64 and 96 on the tiny llama: blocks of 64 and 32) and int8 (two 4-bit
    nibble planes) included; the embedding's rows are dequantized at lookup, never stored dense.
    """
    graph = _quantize(tiny_graph("llama"), bits=bits, group_size=group, symmetric=symmetric)
    session, _ = lowered_session(graph, tmp_path)
    assert {_accuracy(n) for n in onnx_nodes(tmp_path / "model.onnx") if n.op_type == "MatMulNBits"} == {0}
    nodes = [n.op_type for n in onnx_nodes(tmp_path / "model.onnx")]
    assert "MatMulNBits" in nodes and "MatMul" not in nodes and "GatherBlockQuantized" in nodes
    report = check_parity(graph, session, tokens=_ids(graph.meta.vocab_size), quantized=False)
    assert report.max_abs_diff <= 1e-3


@pytest.mark.parametrize("bits, group, symmetric", [(8, -1, True), (8, -1, False), (4, -1, False)])
def test_quantized_weights_stored_as_codes_and_read_back(bits, group, symmetric, tiny_graph, tmp_path):
    """The file holds the IR's codes (no float copy of any quantized weight), and the ONNX frontend
    reads them back bit-identically."""
    import onnx

    graph = _quantize(tiny_graph("llama"), bits=bits, group_size=group, symmetric=symmetric)
    OnnxRuntimeBackend().lower(graph, tmp_path / "art")
    inits = onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph.initializer
    matrices = [t.name for t in inits if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    assert all("rope" in name or name.endswith(".scales") for name in matrices), matrices
    quantized = {n: w for n, w in graph.params.items() if hasattr(w, "packed")}
    back = tokopt.load(str(tmp_path / "art" / "model.onnx"))
    for name, w in quantized.items():
        b = back.params[name]
        assert (b.bits, b.group_size) == (w.bits, w.group_size)
        assert torch.equal(b.packed, w.packed) and torch.equal(b.scales, w.scales)
        assert (b.zero_points is None) == symmetric and (symmetric or torch.equal(b.zero_points, w.zero_points))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_read_at_fp32_accuracy_is_stored_as_its_nibble_planes(symmetric, tiny_graph, tmp_path):
    """The file holds the two planes MatMulNBits reads (as many bytes as the codes), so no session start splits
    the codes again; the frontend recombines them bit-identically (read back above)."""
    import onnx

    graph = _quantize(tiny_graph("llama"), bits=8, group_size=32, symmetric=symmetric)
    OnnxRuntimeBackend().lower(graph, tmp_path / "art")
    model = onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    linears = {n.params["weight"] for n in graph.nodes("Linear")}
    planes = sum(v for n, v in sizes.items() if n.endswith((".q8hi", ".q8lo")))
    assert planes == sum(graph.params[n].packed.numel() for n in linears)  # the codes' bytes, no more
    assert [n for n in sizes if n.endswith(".q8")] == ["model.embed_tokens.weight.q8"]  # gathered at its width
    assert symmetric == ("BitShift" not in {n.op_type for n in model.graph.node})  # asym: only zero points split
    back = tokopt.load(str(tmp_path / "art" / "model.onnx"))
    for name in linears:
        assert torch.equal(back.params[name].packed, graph.params[name].packed)


@pytest.mark.parametrize("bits", [None, 4])
def test_mlp_gate_and_up_run_as_one_matmul(bits, tiny_graph, tmp_path):
    graph = tiny_graph("llama") if bits is None else _quantize(tiny_graph("llama"), bits=bits, group_size=16)
    session, _ = lowered_session(graph, tmp_path)
    layers = len(graph.nodes("Attention"))
    kind = "MatMul" if bits is None else "MatMulNBits"
    fused = [n for n in onnx_nodes(tmp_path / "model.onnx") if n.op_type == kind and "gate_proj+" in n.name]
    assert len(fused) == layers
    assert_parity(graph, session)


@pytest.mark.parametrize("arch, bits", [("qwen2", 4), ("llama", 4), ("llama", 8)])
def test_int8_activations_parity(arch, bits, tiny_graph, tmp_path):
    """act_bits=8 lowers to MatMulNBits accuracy level 4, and the reference computes the same int8
    activations: top-1 agrees everywhere, and the logits are far closer to the modelled reference than
    to one with fp32 activations (not to 1e-3: a float-level difference upstream may flip a rounding)."""
    graph = _quantize(tiny_graph(arch), bits=bits, group_size=32, act_bits=8)
    artifact = OnnxRuntimeBackend().lower(graph, tmp_path / "out")
    nbits = [n for n in onnx_nodes(tmp_path / "out" / "model.onnx") if n.op_type == "MatMulNBits"]
    assert nbits and {_accuracy(n) for n in nbits} == {4}
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in nbits} == {bits}
    assert artifact.extra["parity"]["top1_agreement"] == 1.0
    session = OnnxRuntimeBackend().load(tmp_path / "out", threads=1)
    tokens = _ids(graph.meta.vocab_size)
    modelled = check_parity(graph, session, tokens=tokens, raise_on_failure=False)
    fp32_acts = check_parity(_quantize(tiny_graph(arch), bits=bits, group_size=32), session, tokens=tokens,
                             raise_on_failure=False)
    assert modelled.max_abs_diff * 10 < fp32_acts.max_abs_diff


def test_calibrated_bar_catches_a_wrong_activation_block(tiny_graph, tmp_path):
    """The rounding-jitter bar for act_quant graphs still fails a backend that quantizes different blocks."""
    graph = _quantize(tiny_graph("llama"), bits=4, group_size=16, act_bits=8)
    OnnxRuntimeBackend().lower(graph, tmp_path / "out")
    session = OnnxRuntimeBackend().load(tmp_path / "out", threads=1)
    wrong = graph.copy()
    for node in wrong.nodes("Linear"):
        node.attrs["act_quant"] = {"bits": 8, "block": 32}
    report = check_parity(wrong, session, tokens=_ids(graph.meta.vocab_size), raise_on_failure=False)
    assert not report.passed and report.mean_kl > report.jitter_kl * 1.5
    assert check_parity(graph, session, tokens=_ids(graph.meta.vocab_size), raise_on_failure=False).passed


def test_numerics_the_ir_does_not_describe_are_not_shipped(tiny_graph, tmp_path, monkeypatch):
    """A lowering bug that runs int8 activations where the IR says fp32 is caught by the parity check,
    and nothing (not even a temp directory) is left behind."""
    from tokopt.backends.onnxruntime.ops import nbits

    graph = _quantize(tiny_graph("qwen2"), bits=4, group_size=32)
    monkeypatch.setattr(nbits, "native_act_quant", lambda act_quant, w: nbits.storage_problem(w) is None)
    with pytest.raises(ParityError, match="top-1 agreement"):
        OnnxRuntimeBackend().lower(graph, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _accuracy(node) -> int:
    return next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)


def onnx_nodes(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.node


# -- after every built-in pass ----------------------------------------------------------------------
@pytest.mark.parametrize("arch, pass_name, options", [
    ("llama", "quantize", {"bits": 4, "group_size": 16, "method": "rtn"}),
    ("llama", "quantize", {"bits": 8, "method": "rtn"}),
    ("llama", "sparse-attention", {"window": 6, "sinks": 2}),
    ("mistral", "kv-layout", {"storage": "static", "max_len": 64}),
    ("qwen3", "gqa", {"num_kv_heads": 1, "method": "mean"}),
    ("mixtral", "expert-prune", {"keep": 3}),
])
def test_parity_after_pass(arch, pass_name, options, tiny_graph, tmp_path):
    from tokopt.passes.registry import get_pass_class

    calibration = [_ids(tiny_graph(arch).meta.vocab_size, batch=1, seq=32, seed=i) for i in range(2)]
    graph = get_pass_class(pass_name)(**options).run(tiny_graph(arch), PassContext(calibration)).graph
    artifact = OnnxRuntimeBackend().lower(graph, tmp_path / "out")
    assert artifact.extra["parity"]["passed"]


# -- the artifact directory ---------------------------------------------------------------------------
def test_artifact_directory(tmp_path, tiny_graph):
    from tokopt.backends.artifact import load_artifact, read_manifest

    graph = tiny_graph("llama")
    out = tmp_path / "art"
    OnnxRuntimeBackend().lower(graph, out, recipe={"passes": []})
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "genai_config.json", "tokopt_artifact.json",
            "recipe.yaml"} <= names
    manifest = read_manifest(out)
    assert manifest["backend"] == "onnxruntime" and manifest["parity"]["passed"]
    assert json.loads((out / "config.json").read_text())["architectures"]
    session = load_artifact(out)
    ids = _ids(graph.meta.vocab_size, batch=1, seq=5)
    assert session.forward(ids).shape == (1, 5, graph.meta.vocab_size)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_parity_error_on_mismatch(tiny_model_dir, tiny_graph, tmp_path):
    """A session of a different model fails the check with ParityError."""
    from conftest import build_tiny_model

    build_tiny_model("llama", tmp_path / "other", seed=1)
    other = tokopt.load(str(tmp_path / "other"))
    session, _ = lowered_session(other, tmp_path)
    with pytest.raises(ParityError, match="disagrees"):
        check_parity(tiny_graph("llama"), session, tokens=_ids(other.meta.vocab_size))


def test_external_data_file_holds_weights(tmp_path, tiny_graph):
    session, _ = lowered_session(tiny_graph("gpt2"), tmp_path)
    assert (tmp_path / "model.onnx.data").stat().st_size > 4 * (tmp_path / "model.onnx").stat().st_size


@pytest.mark.skipif(not HAS_GENAI, reason="needs onnxruntime-genai")
@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_onnxruntime_genai_runs_the_artifact(arch, tiny_graph, tmp_path):
    import onnxruntime_genai as og

    graph = tiny_graph(arch)
    out = tmp_path / "art"
    OnnxRuntimeBackend().lower(graph, out)
    if any(n.attrs.get("window") for n in graph.nodes("Attention")):  # mistral's ring: genai cannot feed it
        assert not (out / "genai_config.json").exists()
        return
    prompt = _ids(graph.meta.vocab_size, batch=1, seq=6, seed=3)
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=6 + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt[0].tolist())
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    ours = OnnxRuntimeBackend().load(out).generate(prompt, 12)[0].tolist()
    assert tokens == ours


# -- the real model ------------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_int4_artifact(smollm2_graph, tmp_path):
    """SmolLM2 with int4 weights: MatMulNBits + GQA + fused norms, parity on real text, genai tokens."""
    graph = _quantize(smollm2_graph, bits=4, group_size=32)
    out = tmp_path / "smol"
    artifact = OnnxRuntimeBackend().lower(graph, out)
    assert artifact.extra["parity"]["max_abs_diff"] <= 1e-2
    ops = {n.op_type for n in onnx_nodes(out / "model.onnx")}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    if HAS_GENAI:
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(out)("The capital of France is", return_tensors="pt").input_ids
        model = og.Model(str(out))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + 16, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids[0].tolist())
        tokens = []
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        assert tokens == OnnxRuntimeBackend().load(out).generate(ids, 16)[0].tolist()


# -- memory of the loaded session --------------------------------------------------------------------
def _resident_mapped(directory: Path) -> int:
    """Bytes of this process's mappings of files in ``directory`` that are resident (``/proc/self/smaps``)."""
    prefix, total, inside = str(directory.resolve()) + "/", 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5].startswith(prefix)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def test_page_out_drops_resident_mapped_pages_and_keeps_their_content(tmp_path):
    import mmap

    from tokopt.backends.onnxruntime.mapped_pages import page_out_mapped

    data = bytes(range(256)) * (4 << 12)  # 4 MiB
    (tmp_path / "w.data").write_bytes(data)
    with open(tmp_path / "w.data", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert mapped[:] == data  # every page touched
        if page_out_mapped(tmp_path) < 0:
            pytest.skip("this kernel has no MADV_PAGEOUT (Linux >= 5.4)")
        assert _resident_mapped(tmp_path) < len(data) // 4
        assert mapped[:] == data


def test_the_session_keeps_no_external_data_resident_that_it_does_not_read(tiny_graph, tmp_path):
    """MatMulNBits prepacks its codes and scales; the mapped originals leave the resident set (and the
    artifact still matches the reference)."""
    from tokopt.backends.onnxruntime.mapped_pages import page_out_mapped

    if page_out_mapped(tmp_path) < 0:
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux >= 5.4)")
    graph = _quantize(tiny_graph("llama"), bits=4, group_size=16, act_bits=8)
    session, _ = lowered_session(graph, tmp_path)
    data = (tmp_path / "model.onnx.data").stat().st_size
    assert _resident_mapped(tmp_path) <= data // 8
    assert_parity(graph, session)


def test_a_cache_sized_by_the_caller(tiny_graph, tmp_path):
    """Parity asks for the tokens it runs: a shared buffer reserves those slots, not a 256-slot block;
    a session that takes no length (a plugin's) still gets its cache."""
    from tokopt.backends.base import new_cache

    session, mode = lowered_session(tiny_graph("llama"), tmp_path)
    assert mode == "gqa"
    assert new_cache(session, 2, 20).capacity == 20 and new_cache(session, 2).capacity > 20

    class NoLength:
        def new_cache(self, batch):
            return ("cache", batch)

    assert new_cache(NoLength(), 3, 20) == ("cache", 3)
