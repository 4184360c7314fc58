"""IR invariants: verification, shape inference, cost model, lazy weights, quantized values."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokopt
from tokopt.optimizer import LazyTensor, QuantizedWeight, VerificationError, static_metrics, verify
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.ir.weights import pack_codes, unpack_codes


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    return tokopt.load(path)


def test_weights_stay_lazy_until_executed(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    graph = tokopt.load(path)
    static_metrics(graph)
    str(graph)
    loads: list[str] = []
    for name, w in graph.params.items():
        if isinstance(w, LazyTensor):
            w._loader = (lambda f, n: lambda: loads.append(n) or f())(w._loader, name)
    assert loads == []
    executor = ReferenceExecutor(graph)
    executor.forward(torch.tensor([[1, 2, 3]]))
    assert sorted(loads) == sorted(n for n, w in graph.params.items() if isinstance(w, LazyTensor))
    executor.forward(torch.tensor([[1, 2, 3]]))  # a model within the memory budget keeps its dense weights
    assert len(loads) == len(set(loads))


def test_verify_names_the_stage_and_the_broken_node(llama):
    broken = llama.copy()
    node = broken.nodes("Attention")[0]
    node.attrs["num_kv_heads"] = 3  # k/v projections still produce 2 heads
    with pytest.raises(VerificationError) as info:
        verify(broken, stage="pass:my-pass")
    message = str(info.value)
    assert "pass:my-pass" in message and node.name in message and "num_kv_heads" in message


def test_verify_rejects_dangling_param_and_missing_output(llama):
    broken = llama.copy()
    del broken.params["model.norm.weight"]
    broken.outputs.clear()
    with pytest.raises(VerificationError) as info:
        verify(broken)
    assert "model.norm.weight" in str(info.value) and "logits" in str(info.value)


def test_text_dump_lists_every_node(llama):
    text = str(llama)
    assert text.count("\n") == len(llama) + 1
    assert "%layers.0.attn = Attention(%layers.0.attn.q_proj, %layers.0.attn.k_proj, %layers.0.attn.v_proj)" in text


def test_cost_model_by_hand(llama):
    m = static_metrics(llama, contexts=(4, 1000))
    h, i, v, layers, kvh, d = 64, 96, 256, 2, 2, 16
    per_layer = h * h * 2 + 2 * h * kvh * d + 3 * h * i + 2 * h
    assert m.params == v * h * 2 + layers * per_layer + h  # untied lm_head
    assert m.weight_bytes == 4 * m.params
    assert m.kv_bytes_per_token == layers * 2 * kvh * d * 4
    assert m.kv_bytes_at["1000"] == 1000 * m.kv_bytes_per_token
    linear_flops = 2 * (layers * (per_layer - 2 * h) + v * h)
    attention_flops = layers * 4 * 4 * d * 512
    assert m.flops_per_token == linear_flops + attention_flops + sum(
        n.outputs[0].shape[-1] * (4 if n.op == "RMSNorm" else 1)
        for n in llama.nodes() if n.op in ("RMSNorm", "Add", "Mul", "Activation"))


def test_window_caps_kv_bytes(tiny_model_dir):
    path, _ = tiny_model_dir("mistral")
    m = static_metrics(tokopt.load(path), contexts=(4, 100))
    assert m.kv_bytes_at["4"] == 4 * m.kv_bytes_per_token
    assert m.kv_bytes_at["100"] == 8 * m.kv_bytes_per_token  # window 8


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (5, 33), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[1] == (33 if bits == 8 else 17)
    assert torch.equal(unpack_codes(packed, bits, 33), codes.to(torch.int16))
    if bits == 4:
        assert packed[0, 0].item() == codes[0, 0].item() | (codes[0, 1].item() << 4)


def test_quantized_weight_dequantizes_by_definition():
    codes = torch.tensor([[0, 15, 8, 7], [1, 2, 3, 4]])
    scales = torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    zeros = torch.tensor([[8, 8], [0, 4]], dtype=torch.uint8)
    qw = QuantizedWeight(pack_codes(codes, 4), scales, zeros, bits=4, group_size=2, shape=(2, 4))
    expected = torch.tensor([[-4.0, 3.5, 0.0, -2.0], [1.0, 2.0, -1.0, 0.0]])
    assert torch.equal(qw.dequantize(), expected)
    assert qw.nbytes == 4 + 4 * 4 + 4
    symmetric = QuantizedWeight(pack_codes(codes, 4), scales, None, bits=4, group_size=2, shape=(2, 4))
    assert torch.equal(symmetric.dequantize()[0], expected[0])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kv_heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([8, 16]), layers=st.integers(1, 2),
       tie=st.booleans(), seq=st.integers(1, 12))
def test_random_llama_configs_match_transformers(tmp_path_factory, kv_heads, head_dim, layers, tie, seq):
    import transformers as tf

    path = tmp_path_factory.mktemp("hyp")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                            tie_word_embeddings=tie, initializer_range=0.2)
    config._attn_implementation = "eager"
    hf = tf.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(path)
    graph = tokopt.load(path)
    assert static_metrics(graph).params == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (ReferenceExecutor(graph).forward(ids) - expected).abs().max().item() <= 1e-4


def test_tiny_builder_helper_is_deterministic(tmp_path):
    a = build_tiny_model("gpt2", tmp_path / "a")
    b = build_tiny_model("gpt2", tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
