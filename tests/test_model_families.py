"""The families beyond llama: each one's distinctive attribute is in the IR, matters, and is honoured.

Logits parity with transformers and cached decode == recompute run for every family in
``test_frontend_parity.py``, and onnxruntime parity in ``test_onnxruntime_backend.py`` (both
parametrized over ``conftest.ARCHITECTURES``); this file adds what is particular to a family.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ARCHITECTURES, tiny_config

import tokopt
from tokopt.cli import cli
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.graph import Value
from tokopt.optimizer.ir.summary import describe

NEW_FAMILIES = ("qwen3_moe", "gemma2", "gemma3_text", "phi3", "smollm3", "gpt_oss", "olmo2", "granite")


def _ids(seq: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_matches_transformers(arch, tiny_model_dir):
    path, hf = tiny_model_dir(arch)
    ids = _ids(8, seed=4)
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ReferenceExecutor(tokopt.load(path)).generate(ids, 32)
    assert got[0].tolist() == expected[0, 8:].tolist()


#: What ``tokopt inspect --json`` must show for each family (a subset of ``features``).
EXPECTED_FEATURES = {
    "gemma2": {"attention_softcap": 2.0, "final_softcap": 5.0, "norms_per_layer": 4, "qk_norm": None,
               "scales": {"embed_scale": 8.0}, "attention_scale": 24 ** -0.5},
    "gemma3_text": {"qk_norm": "per-head", "norms_per_layer": 4, "scales": {"embed_scale": 8.0},
                    "rope": [{"type": "default", "theta": 10000.0, "rotary_dim": 32},
                             {"type": "linear", "theta": 1000000.0, "rotary_dim": 32}]},
    "phi3": {"rope": {"type": "longrope", "theta": 10000.0, "rotary_dim": 12, "long_from": 64}},
    "smollm3": {"rope": [{"type": "default", "theta": 2000000.0, "rotary_dim": 16}, None]},
    "gpt_oss": {"learned_sink_logits": True,
                "moe": {"routing": "topk_softmax", "norm_topk_prob": False, "shared_expert": False,
                        "glu": {"kind": "clamped_swiglu", "alpha": 1.702, "limit": 7.0},
                        "biases": ["experts.down_bias", "experts.gate_bias", "experts.up_bias", "router_bias"]}},
    "olmo2": {"qk_norm": "projection", "norms_per_layer": 4},
    "granite": {"attention_scale": 0.2, "scales": {
        "embed_scale": 6.0, "layers.0.attn_residual_scale": 0.5, "layers.0.mlp_residual_scale": 0.5,
        "layers.1.attn_residual_scale": 0.5, "layers.1.mlp_residual_scale": 0.5, "logits_scale": 2.0}},
    "qwen3_moe": {"qk_norm": "per-head", "moe": {"routing": "softmax_topk", "norm_topk_prob": False, "glu": "silu",
                                                "shared_expert": False, "biases": []}},
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_FEATURES))
def test_inspect_json_shows_what_is_distinctive(arch, tiny_model_dir):
    result = CliRunner().invoke(cli, ["inspect", str(tiny_model_dir(arch)[0]), "--json"])
    assert result.exit_code == 0, result.output
    features = json.loads(result.stdout)["features"]
    for key, value in EXPECTED_FEATURES[arch].items():
        assert features[key] == pytest.approx(value) if isinstance(value, float) else features[key] == value, key


def _without(graph, arch: str):
    """The graph with its family's distinctive attribute removed (the logits must then change)."""
    g = graph.copy()
    attn = g.nodes("Attention")
    if arch == "gemma2":
        for n in attn:
            n.attrs["softcap"] = None
    elif arch == "gemma3_text":  # every layer on the local RoPE
        for n in attn:
            n.attrs["rope"] = dict(attn[0].attrs["rope"])
    elif arch == "phi3":
        for n in attn:
            n.attrs["rope"] = {k: v for k, v in n.attrs["rope"].items()
                               if k not in ("long_inv_freq", "original_max_positions")}
    elif arch == "smollm3":
        attn[1].attrs["rope"] = dict(attn[0].attrs["rope"])
    elif arch == "gpt_oss":
        for n in attn:
            del n.params["sink_logits"]
    elif arch in ("granite", "olmo2"):  # bypass the multipliers / the q and k projection norms
        for n in g.nodes("Scale" if arch == "granite" else "RMSNorm"):
            if arch == "granite" or ".attn." in n.name:
                g.replace_uses(Value(n.name, 0), g.inputs_of(n.name)[0])
        g.eliminate_dead_code()
    return g


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "phi3", "smollm3", "gpt_oss", "granite", "olmo2"])
def test_the_distinctive_attribute_matters(arch, tiny_model_dir):
    """Dropping what makes the family different changes the logits (past phi3's 64-token switch point)."""
    graph = tokopt.load(tiny_model_dir(arch)[0])
    ids = _ids(80 if arch == "phi3" else 24, seed=5)
    kept, dropped = ReferenceExecutor(graph).forward(ids), ReferenceExecutor(_without(graph, arch)).forward(ids)
    assert (kept - dropped).abs().max() > 1e-3


def test_longrope_past_the_switch_matches_transformers_and_onnxruntime(tiny_model_dir, tmp_path):
    """Phi-3's LongRoPE: a forward reaching past original_max_positions (64) rotates with the long factors
    (transformers' rule); cached steps keep their keys' rotation, on the reference, the compiled torch session
    and onnxruntime alike — with partial rotary (standard-op attention) and full rotary (GroupQueryAttention,
    tables switched per step)."""
    pytest.importorskip("onnxruntime")
    from tokopt.backends.onnxruntime.external_data import write_model
    from tokopt.backends.onnxruntime.lower import lower_graph
    from tokopt.backends.onnxruntime.session import OnnxRuntimeSession

    path, hf = tiny_model_dir("phi3")
    ids = _ids(100, seed=6)
    with torch.no_grad():
        assert (ReferenceExecutor(tokopt.load(path)).forward(ids) - hf(ids).logits).abs().max() <= 1e-4
    full = tmp_path / "phi3_full_rotary"
    config = tiny_config("phi3")
    config.rope_parameters["partial_rotary_factor"] = 1.0
    config.rope_parameters["short_factor"] = config.rope_parameters["short_factor"] + [1.0, 1.0]
    config.rope_parameters["long_factor"] = config.rope_parameters["long_factor"] + [4.0, 5.0]
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).eval().save_pretrained(full)
    from tokopt.backends.torch.compiled import CompiledSession

    chunks = (ids[:, :60], *(ids[:, t:t + 1] for t in range(60, 70)), ids[:, 70:100])
    graph = tokopt.load(path)
    ref, compiled = ReferenceExecutor(graph), CompiledSession(graph, compile=True, max_len=128)
    rc, cc = ref.new_cache(), compiled.new_cache()
    for chunk in chunks:
        assert (ref.forward(chunk, rc) - compiled.forward(chunk, cc)).abs().max() <= 1e-3, ("compiled", chunk.shape)
    for source, mode in ((path, "decomposed"), (full, "gqa")):
        graph = tokopt.load(source)
        ctx = lower_graph(graph)
        assert ctx.attention_mode == mode
        write_model(ctx.b, tmp_path / f"{mode}.onnx")
        session = OnnxRuntimeSession(tmp_path / f"{mode}.onnx", threads=1)
        ref = ReferenceExecutor(graph)
        rc, oc = ref.new_cache(), session.new_cache(1)
        for chunk in chunks:
            assert (ref.forward(chunk, rc) - session.forward(chunk, oc)).abs().max() <= 1e-3, (mode, chunk.shape)


@pytest.mark.parametrize("arch,norm_topk_prob", [("qwen3_moe", True), ("qwen2_moe", False)])
def test_moe_routing_renormalisation_both_ways(arch, norm_topk_prob, tmp_path):
    """The MoE families' default configs take one side of norm_topk_prob; this takes the other."""
    pytest.importorskip("onnxruntime")
    from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend

    config = tiny_config(arch)
    config.norm_topk_prob = norm_topk_prob
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path / "model")
    graph = tokopt.load(tmp_path / "model")
    assert {n.attrs["norm_topk_prob"] for n in graph.nodes("MoE")} == {norm_topk_prob}
    ids = _ids(16, batch=2, seed=7)
    with torch.no_grad():
        assert (ReferenceExecutor(graph).forward(ids) - hf(ids).logits).abs().max() <= 1e-4
    artifact = OnnxRuntimeBackend().lower(graph, tmp_path / "art")  # raises ParityError unless it matches
    assert (artifact.path / "model.onnx").exists()


@pytest.mark.parametrize("arch", NEW_FAMILIES)
def test_optimize_quantize_int4_end_to_end(arch, tiny_model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["optimize", str(tiny_model_dir(arch)[0]), "--passes", "quantize:bits=4",
                                      "--backend", "onnxruntime", "--speed", "off", "--eval-tokens", "2x16",
                                      "--calib-tokens", "2x16", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["stages"][-1]["name"].startswith("quantize")
    assert (out / "model.onnx").exists()


def test_gemma3_alternates_windows_and_rope_bases(tiny_model_dir):
    graph = tokopt.load(tiny_model_dir("gemma3_text")[0])
    attn = graph.nodes("Attention")
    assert [n.attrs["window"] for n in attn] == [8, None]
    assert [n.attrs["rope"]["theta"] for n in attn] == [10000.0, 1000000.0]
    assert describe(graph)["features"]["qk_norm"] == "per-head"


# -- passes on the families' attributes ---------------------------------------------------------
def test_sparse_attention_keeps_a_trained_local_window(tiny_model_dir):
    """Gemma 2's local layers (trained window 8) are never widened nor given sinks; its global layers get the
    window; a window narrower than the trained one narrows it."""
    from tokopt.optimizer.pass_api import PassContext
    from tokopt.passes.sparse_attention import SparseAttention

    graph = tokopt.load(tiny_model_dir("gemma2")[0])
    wide = SparseAttention(window=16, sinks=2).run(graph, PassContext())
    assert [(n.attrs["window"], n.attrs["sinks"]) for n in wide.graph.nodes("Attention")] == [(8, 0), (16, 2)]
    assert any("keep their trained window" in note for note in wide.notes)
    narrow = SparseAttention(window=4, sinks=0).run(graph, PassContext())
    assert [n.attrs["window"] for n in narrow.graph.nodes("Attention")] == [4, 4]


def test_gqa_on_families(tiny_model_dir, tmp_path):
    """head_dim != hidden/heads (Gemma 3) merges like any other; OLMo 2's whole-projection q/k norms are refused
    by name (a merge would mix what the norm keeps together)."""
    result = CliRunner().invoke(cli, ["optimize", str(tiny_model_dir("gemma3_text")[0]), "--passes",
                                      "gqa:num_kv_heads=1,method=mean", "--backend", "onnxruntime", "--speed", "off",
                                      "--eval-tokens", "2x16", "-o", str(tmp_path / "g3")])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(cli, ["optimize", str(tiny_model_dir("olmo2")[0]), "--passes",
                                       "gqa:num_kv_heads=1", "--dry-run"])
    assert refused.exit_code == 2 and "q from RMSNorm layers.0.attn.q_norm" in refused.output


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "gpt_oss", "mixtral"])
def test_quantize_covers_moe_experts(arch, tiny_model_dir, tmp_path):
    """Expert stacks (and shared experts) become int4 codes, row by row as their definition says; routers and
    biases stay float; onnxruntime runs the stacks as MatMulNBits and matches the reference exactly (float
    activations), and the artifact reads back bit-identical."""
    pytest.importorskip("onnxruntime")
    import onnx

    from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend
    from tokopt.backends.onnxruntime.session import OnnxRuntimeSession
    from tokopt.optimizer.ir.weights import QuantizedWeight, materialize
    from tokopt.optimizer.pass_api import PassContext
    from tokopt.passes.quant.rtn import quantize_rtn
    from tokopt.passes.quantize import EXPERT_ROLES, QuantizePass

    graph = tokopt.load(tiny_model_dir(arch)[0])
    quantized = QuantizePass(bits=4, group_size=16, method="rtn", act_bits=0).run(graph, PassContext()).graph
    for node in quantized.nodes("MoE"):
        for role, pname in node.params.items():
            w = quantized.params[pname]
            assert isinstance(w, QuantizedWeight) == (role in EXPERT_ROLES), role
            if role in EXPERT_ROLES:
                dense = materialize(graph.params[graph.node(node.name).params[role]], torch.float32)
                rows = quantize_rtn(dense.reshape(-1, dense.shape[-1]), 4, 16, True, "float16").dequantize()
                assert w.shape == tuple(dense.shape) and torch.equal(w.dequantize(), rows.reshape(dense.shape))
    artifact = OnnxRuntimeBackend().lower(quantized, tmp_path / "art")  # parity-checked on the way out
    ops = {n.op_type for n in onnx.load(artifact.path / "model.onnx", load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    back = tokopt.load(artifact.path)
    ids = _ids(20, batch=2, seed=8)
    assert torch.equal(ReferenceExecutor(back).forward(ids), ReferenceExecutor(quantized).forward(ids))
    session = OnnxRuntimeSession(artifact.path / "model.onnx", threads=1)
    assert (session.forward(ids, session.new_cache(2)) - ReferenceExecutor(quantized).forward(ids)).abs().max() <= 1e-3


def test_gemma3_gguf_loads_with_transformers_parity(tmp_path, monkeypatch):
    """The issue's first user: a Gemma 3 GGUF (llama.cpp's layout, norms stored as 1 + w) is read through
    transformers' GGUF reader and matches the model transformers builds from the same file; the cached HF
    directory names its architecture, as other tools (llama.cpp's converter, optimum) require."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("TOKOPT_CACHE_DIR", str(tmp_path / "cache"))  # converted here, not read from a cache
    from tiny_models import save_tiny_gguf
    from transformers import AutoModelForCausalLM

    path = save_tiny_gguf(tmp_path / "tiny-gemma3.gguf", arch="gemma3", layers=2)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    graph = tokopt.load(path)
    assert graph.meta.model_type == "gemma3_text"
    config = json.loads((Path(graph.meta.tokenizer_path) / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__]
    ids = _ids(24, batch=2, seed=9) % 61 + 3
    with torch.no_grad():
        expected = hf(ids).logits
    assert (ReferenceExecutor(graph).forward(ids) - expected).abs().max() <= 1e-4
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    features = info["features"]
    assert info["window"] == 8 and features["qk_norm"] == "per-head" and features["norms_per_layer"] == 4
