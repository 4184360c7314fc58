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


def save_tiny_gguf(path: Path, vocab: int = 64, hidden: int = 32, layers: int = 1, heads: int = 4, kv_heads: int = 2,
                   ffn: int = 48, seed: int = 0, arch: str = "llama") -> Path:
    """A ~50 KB GGUF (fp32 tensors, a SentencePiece-style vocabulary) written with ``gguf``: ``arch`` llama,
    or gemma3 (per-head q/k norms, sandwich norms stored as ``1 + w`` the way llama.cpp writes Gemma, tied
    embedding, head_dim 16 != hidden/heads, a sliding window of 8).

    The vocabulary spells the words ``w1 … w{vocab - 16}``: besides them it holds the pieces they are
    merged from (``▁``, ``w``, the digits, ``▁w``), so the merges recovered from it encode such text.
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    gemma = arch == "gemma3"
    head_dim = 16 if gemma else hidden // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    if gemma:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(8)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    pieces = ["\u2581", "w", *"0123456789", "\u2581w"]
    words = [f"\u2581w{i}" for i in range(1, vocab - 3 - len(pieces) + 1)]
    writer.add_token_list(["<unk>", "<s>", "</s>", *pieces, *words])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"token_embd.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (q, hidden),
                       f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_v.weight": (kv, hidden),
                       f"blk.{i}.attn_output.weight": (hidden, q), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
        if gemma:
            shapes.update({f"blk.{i}.attn_q_norm.weight": (head_dim,), f"blk.{i}.attn_k_norm.weight": (head_dim,),
                           f"blk.{i}.post_attention_norm.weight": (hidden,),
                           f"blk.{i}.post_ffw_norm.weight": (hidden,)})
    shapes["output_norm.weight"] = (hidden,)
    if not gemma:
        shapes["output.weight"] = (vocab, hidden)
    for name, shape in shapes.items():
        data = rng.standard_normal(shape) * 0.2
        if gemma and name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp stores Gemma's norms as 1 + w
        writer.add_tensor(name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
