"""``genai_config.json``: what onnxruntime-genai needs to run the artifact directory as is.

The layout follows the files onnxruntime-genai's own model builder writes: the decoder's
file name and tensor names, head counts and sizes, token ids and search defaults (greedy).
The model ``type`` must be one genai knows; every tokopt decoder uses the llama-style
interface, so unknown architectures fall back to ``llama``.
"""

from __future__ import annotations

from typing import Any

from tokopt.backends.onnxruntime.lower import LowerContext

GENAI_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "olmo", "granite"}  # others: "llama"


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def genai_can_run(ctx: LowerContext) -> bool:
    """Whether onnxruntime-genai can feed this decoder's cache: its KV cache expects ``present`` to be
    ``past + new`` tokens (or the shared GQA buffer), which a windowed layer's bounded ring is not."""
    return not any(n.attrs.get("window") for n in ctx.graph.nodes("Attention"))


def genai_config(ctx: LowerContext, model_file: str = "model.onnx", threads: int | None = None) -> dict[str, Any]:
    graph = ctx.graph
    meta = graph.meta
    first = graph.nodes("Attention")[0].attrs if graph.nodes("Attention") else {}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if ctx.uses_position_ids:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads:
        session_options["intra_op_num_threads"] = int(threads)
    eos = meta.eos_token_id
    pad = meta.hf_config.get("pad_token_id")
    return {
        "model": {
            "bos_token_id": meta.bos_token_id if meta.bos_token_id is not None else _first(eos),
            "context_length": ctx.max_length,
            "decoder": {
                "session_options": session_options,
                "filename": model_file,
                "head_size": first.get("head_dim"),
                "hidden_size": meta.hidden_size,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": first.get("num_heads"),
                "num_hidden_layers": len(ctx.kv),
                "num_key_value_heads": first.get("num_kv_heads"),
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else _first(eos),
            "type": meta.model_type if meta.model_type in GENAI_TYPES else "llama",
            "vocab_size": meta.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": ctx.max_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": ctx.attention_mode == "gqa",
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
