"""ONNX input: tokopt's own onnxruntime artifacts round-trip exactly; Hugging Face exports with past
key values (torch.onnx.export, the layout optimum writes) import with logits matching the source file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import tokopt  # noqa: E402
from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend  # noqa: E402
from tokopt.errors import ModelSourceError, UnsupportedArchitectureError  # noqa: E402
from tokopt.optimizer.interpret import ReferenceExecutor  # noqa: E402
from tokopt.optimizer.pass_api import PassContext  # noqa: E402


def _ids(vocab: int, batch: int = 2, seq: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "qwen2_moe", "gemma2", "gemma3_text", "phi3", "smollm3",
                                  "gpt_oss", "olmo2", "granite", "qwen3_moe"])
def test_roundtrip_own_artifact_is_exact(arch, tiny_model_dir, tmp_path):
    graph = tokopt.load(str(tiny_model_dir(arch)[0]))
    OnnxRuntimeBackend().lower(graph, tmp_path / "art")
    back = tokopt.load(str(tmp_path / "art"))  # the directory, as `tokopt optimize ARTIFACT` gets it
    assert back.history[-1] == "frontend:onnx:tokopt"
    assert [n.name for n in back.nodes()] == [n.name for n in graph.nodes()]
    assert set(back.params) == set(graph.params)
    ids = _ids(graph.meta.vocab_size)
    assert torch.equal(ReferenceExecutor(back).forward(ids), ReferenceExecutor(graph).forward(ids))


@pytest.mark.parametrize("arch", ["qwen2", "gpt_oss", "qwen2_moe"])
def test_roundtrip_quantized_weights_bit_identical(arch, tiny_model_dir, tmp_path):
    """Linears, and MoE expert stacks (gate/up row-stacked, down laid along the input), come back bit-identical."""
    from tokopt.passes.quantize import QuantizePass

    graph = tokopt.load(str(tiny_model_dir(arch)[0]))
    graph = QuantizePass(bits=4, group_size=16, symmetric=False, method="rtn").run(graph, PassContext()).graph
    OnnxRuntimeBackend().lower(graph, tmp_path / "art")
    back = tokopt.load(str(tmp_path / "art" / "model.onnx"))
    for name, w in graph.params.items():
        if hasattr(w, "packed"):
            b = back.params[name]
            assert torch.equal(b.packed, w.packed) and torch.equal(b.scales, w.scales)
            assert b.scales.dtype == w.scales.dtype and torch.equal(b.zero_points, w.zero_points)
            assert b.shape == w.shape
    # the round-tripped graph lowers again (passes and backends apply to it)
    OnnxRuntimeBackend().lower(back, tmp_path / "again")


def export_hf_with_past(model, out: Path, layers: int, kv_heads: int, head_dim: int) -> Path:
    """torch.onnx.export of an HF decoder with past key values, named the way optimum names them."""
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(0, len(past), 2):
                cache.update(past[i], past[i + 1], i // 2)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_in += [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "seq"}, **{n: {0: "batch", 2: "past"} for n in names_in[3:]}}
    past = [torch.randn(1, kv_heads, 3, head_dim) for _ in range(2 * layers)]
    args = (torch.randint(0, 100, (1, 4)), torch.ones(1, 7, dtype=torch.long), torch.arange(3, 7)[None], *past)
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(WithPast(model).eval(), args, str(out / "model.onnx"), input_names=names_in,
                      output_names=names_out, dynamic_axes=dynamic, dynamo=False, opset_version=18)
    model.config.save_pretrained(out)
    return out / "model.onnx"


def run_export(path: Path, ids: torch.Tensor, kv_heads: int, head_dim: int) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b, s = ids.shape
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((b, s), np.int64),
             "position_ids": np.broadcast_to(np.arange(s), (b, s)).copy()}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((b, kv_heads, 0, head_dim), np.float32)
    return session.run(["logits"], feeds)[0]


# Not here because torch.onnx (TorchScript exporter, opset 18) cannot export them: phi3 (LongRoPE's in-place
# frequency switch, aten::copy), the MoE families (their expert loop's aten::histc).
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3_text", "olmo2", "granite", "smollm3"])
def test_hf_export_with_past_imports(arch, tiny_model_dir, tmp_path):
    import warnings

    from conftest import build_tiny_model

    hf = build_tiny_model(arch, tmp_path / "src")
    with torch.no_grad():  # a trained model has no two equal tensors (the exporter dedupes equal constants)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = hf.config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_hf_with_past(hf, tmp_path / "export", cfg.num_hidden_layers, kv_heads, head_dim)
    graph = tokopt.load(str(path))
    assert graph.history[-1].startswith("frontend:onnx:hf-export")
    ids = _ids(cfg.vocab_size, batch=1, seq=8)
    expected = run_export(path, ids, kv_heads, head_dim)
    got = ReferenceExecutor(graph).forward(ids).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    # and the imported graph goes through a backend again
    OnnxRuntimeBackend().lower(graph, tmp_path / "art")


def test_export_without_config_is_refused(tiny_model_dir, tmp_path):
    src, hf = tiny_model_dir("llama")
    cfg = hf.config
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_hf_with_past(hf, tmp_path / "export", cfg.num_hidden_layers, cfg.num_key_value_heads,
                                   cfg.hidden_size // cfg.num_attention_heads)
    (path.parent / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="config.json"):
        tokopt.load(str(path))


def test_unrecognised_onnx_names_the_problem(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(model, str(tmp_path / "relu.onnx"))
    with pytest.raises(UnsupportedArchitectureError, match="input_ids"):
        tokopt.load(str(tmp_path / "relu.onnx"))


def test_contrib_op_decoders_are_refused_by_name(tiny_model_dir, tmp_path):
    """A decoder made of onnxruntime contrib ops that carries no tokopt description is named, not guessed."""
    import onnx

    graph = tokopt.load(str(tiny_model_dir("llama")[0]))
    OnnxRuntimeBackend().lower(graph, tmp_path / "art")
    model = onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False)
    del model.metadata_props[:]
    shutil.copy(tmp_path / "art" / "model.onnx.data", tmp_path / "model.onnx.data")
    (tmp_path / "config.json").write_text(json.dumps(graph.meta.hf_config))
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(UnsupportedArchitectureError, match="GroupQueryAttention"):
        tokopt.load(str(tmp_path / "model.onnx"))
