"""Tiny random Hugging Face checkpoints built in-process (no network), for backend and plugin tests."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(path: Path, layers: int = 4, seed: int = 0, with_tokenizer: bool = True, **overrides) -> Path:
    """A 4-layer llama (GQA 4/2 heads) with a word-level tokenizer, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path)
    if with_tokenizer:
        save_word_tokenizer(path, cfg["vocab_size"])
    return path


def save_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer over ``w0 … wN`` (enough to round-trip token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def sample_ids(batch: int = 2, seq: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)
