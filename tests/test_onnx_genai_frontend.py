"""onnxruntime-genai model builder output imports: logits match the builder's own file run by onnxruntime.

Tiny llama-family models are saved as HF directories and converted by the real builder
(``python -m onnxruntime_genai.models.builder``), fp32 and int4, so the tests follow the
layout the builder really writes rather than a hand-made imitation of it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    not (importlib.util.find_spec("onnxruntime_genai") and importlib.util.find_spec("onnx_ir")),
    reason="needs onnxruntime-genai's model builder: pip install onnxruntime-genai onnx_ir")

import tokopt  # noqa: E402
from tokopt.backends.onnxruntime.session import OnnxRuntimeSession  # noqa: E402
from tokopt.backends.parity import check_parity  # noqa: E402
from tokopt.errors import UnsupportedArchitectureError  # noqa: E402
from tokopt.optimizer.ir.weights import QuantizedWeight  # noqa: E402

# head_size 16 (GroupQueryAttention's CPU kernel) and K a multiple of the int4 block of 32
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.2,
            bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _save_tokenizer(path: Path) -> None:
    """The builder insists on a tokenizer: a word-level one over the tiny vocabulary will do."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(TINY["vocab_size"] - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>") \
        .save_pretrained(str(path))


def _save_hf(kind: str, path: Path) -> Path:
    import transformers as tf
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if kind == "llama3-rope":  # untied, a scaled RoPE the importer must read back exactly
        config = tf.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE)
    elif kind == "llama-tied":
        config = tf.LlamaConfig(**TINY, rope_theta=10000.0, tie_word_embeddings=True)
    elif kind == "qwen2":  # q/k/v biases, tied fp32 embedding read through a Transpose
        config = tf.Qwen2Config(**TINY, tie_word_embeddings=True)
    else:
        raise ValueError(kind)
    config.architectures = ["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    _save_tokenizer(path)
    return path


def _build(hf: Path, out: Path, precision: str, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p",
           precision, "-e", "cpu", "-c", str(out.parent / "cache")]
    if extra:
        cmd += ["--extra_options", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"model builder failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def builder_output(tmp_path_factory):
    """``builder_output(name)`` -> directory of the builder's output, built once per module."""
    root = tmp_path_factory.mktemp("genai_builder")
    recipes = {
        "fp32": ("llama3-rope", "fp32", ()),
        "int4-acc4": ("llama-tied", "int4", ("block_size=32", "accuracy_level=4")),
        "int4-acc1": ("llama-tied", "int4", ("block_size=32", "accuracy_level=1")),
        "qwen2-fp32": ("qwen2", "fp32", ()),
    }
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            kind, precision, extra = recipes[name]
            hf = root / f"hf-{kind}"
            if not hf.exists():
                _save_hf(kind, hf)
            cache[name] = _build(hf, root / name, precision, *extra)
        return cache[name]

    return get


def _ids(vocab: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["fp32", "qwen2-fp32"])
def test_fp32_builder_output_matches_onnxruntime(name, builder_output, one_thread):
    out = builder_output(name)
    graph = tokopt.load(str(out))
    assert graph.history[-1].startswith("frontend:onnx:genai-builder")
    assert graph.meta.tokenizer_path == str(out)
    assert not any(isinstance(w, QuantizedWeight) for w in graph.params.values())
    report = check_parity(graph, OnnxRuntimeSession(out / "model.onnx", threads=1),
                          tokens=_ids(graph.meta.vocab_size, 12), decode_steps=4, raise_on_failure=False)
    assert report.passed and report.max_abs_diff <= 1e-3, report


def test_scaled_rope_is_read_back_exactly(builder_output):
    """llama3 RoPE: the frequencies baked into the builder's caches are those of the HF frontend, bit for bit."""
    out = builder_output("fp32")
    imported = tokopt.load(str(out)).nodes("Attention")[0].attrs["rope"]
    source = tokopt.load(str(out.parent / "hf-llama3-rope")).nodes("Attention")[0].attrs["rope"]
    assert imported["inv_freq"] == source["inv_freq"]
    assert imported["rotary_dim"] == source["rotary_dim"] and imported["attention_factor"] == 1.0


@pytest.mark.parametrize("level", [4, 1])
def test_int4_builder_output_holds_the_builders_codes(level, builder_output, one_thread):
    out = builder_output(f"int4-acc{level}")
    graph = tokopt.load(str(out))
    linears = graph.nodes("Linear")
    for node in linears:
        w = graph.params[node.params["weight"]]
        assert isinstance(w, QuantizedWeight) and (w.bits, w.group_size, w.symmetric) == (4, 32, True), node.name
        # accuracy_level 4 is int8 activations per weight block (what MLAS computes); 1 is fp32
        assert node.attrs["act_quant"] == ({"bits": 8, "block": 32} if level == 4 else None), node.name
    # the tied embedding is read by GatherBlockQuantized from the lm_head's own codes: one parameter
    assert graph.nodes("Embedding")[0].params["weight"] == linears[-1].params["weight"]
    report = check_parity(graph, OnnxRuntimeSession(out / "model.onnx", threads=1),
                          tokens=_ids(graph.meta.vocab_size, 32), raise_on_failure=False)
    assert report.passed, report
    if level == 1:  # the same codes and fp32 arithmetic: only summation order differs
        assert report.max_abs_diff <= 1e-3, report


def test_imported_int4_lowers_again(builder_output, tmp_path, one_thread):
    """The imported graph is an ordinary IR graph: tokopt's own backend lowers it (and checks parity)."""
    from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend

    graph = tokopt.load(str(builder_output("int4-acc4")))
    OnnxRuntimeBackend().lower(graph, tmp_path / "art")
    back = tokopt.load(str(tmp_path / "art"))
    w = back.params[back.nodes("Linear")[0].params["weight"]]
    assert torch.equal(w.packed, graph.params[graph.nodes("Linear")[0].params["weight"]].packed)


def _copy_output(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def test_unrecognised_builder_node_is_named(builder_output, tmp_path):
    import onnx

    out = _copy_output(builder_output("fp32"), tmp_path / "gelu")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    act = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    act.op_type, act.domain = "FastGelu", "com.microsoft"
    onnx.save(model, str(out / "model.onnx"))
    with pytest.raises(UnsupportedArchitectureError, match=r"com\.microsoft::FastGelu '/model/layers\.0/mlp/act_fn"):
        tokopt.load(str(out))


def test_unsupported_builder_model_type_is_named(builder_output, tmp_path):
    out = _copy_output(builder_output("fp32"), tmp_path / "phi")
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["type"] = "phi3"
    (out / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="'phi3'.*supported: llama, mistral, qwen2"):
        tokopt.load(str(out))
