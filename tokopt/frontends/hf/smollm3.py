"""SmolLM3: llama with NoPE layers — ``no_rope_layers[i] == 0`` marks a layer without positional encoding.

The IR carries it as that Attention node's ``rope = None``; the other layers keep their RoPE.
"""

from tokopt.frontends.hf.builder import HFSource, rope_attrs
from tokopt.frontends.hf.llama_like import LlamaLikeSpec, build_llama_like, sliding_windows_from_config
from tokopt.optimizer.ir.graph import Graph


def build(src: HFSource) -> Graph:
    head_dim = src.get("head_dim") or src.get("hidden_size") // src.get("num_attention_heads")
    rope = rope_attrs(src, head_dim)
    uses_rope = src.get("no_rope_layers") or [1] * src.get("num_hidden_layers")
    bias = bool(src.get("attention_bias", False))
    spec = LlamaLikeSpec(qkv_bias=bias, o_bias=bias, windows=sliding_windows_from_config(src),
                         ropes=[rope if use else None for use in uses_rope])
    return build_llama_like(src, "SmolLM3ForCausalLM", spec)
