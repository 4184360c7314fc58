"""GPT-2: classic multi-head attention with LayerNorm, learned positions and Conv1D layers.

GPT-2 stores its projections as ``Conv1D`` weights of shape (in, out) and fuses q, k and
v into one ``c_attn``.  The builder splits and transposes them lazily into three
ordinary ``Linear`` nodes so every pass sees the same attention structure as in llama.
"""

from __future__ import annotations

from tokopt.errors import UnsupportedArchitectureError
from tokopt.frontends.hf.builder import GraphBuilder, HFSource, default_scale
from tokopt.optimizer.ir.graph import Graph, Value


def _conv1d(b: GraphBuilder, key: str, cols: slice | None = None) -> str:
    """Register Conv1D weight ``key`` (in, out) as a Linear weight (out, in), optionally a column slice."""
    if key not in b.src.tensors:
        b.param(key)  # raises, naming the missing tensor
    src = b.src.tensors[key]
    in_f, out_f = src.shape
    cols = cols or slice(0, out_f)
    span = "" if (cols.start, cols.stop) == (0, out_f) else f"[{cols.start}:{cols.stop}]"
    return b.derived_param(f"{key}{span}.T",
                           src.derive((cols.stop - cols.start, in_f), lambda t: t[:, cols].t().contiguous()))


def _bias(b: GraphBuilder, key: str, cols: slice) -> str:
    src = b.src.tensors[key]
    if (cols.start, cols.stop) == (0, src.shape[0]):
        return b.param(key)
    return b.derived_param(f"{key}[{cols.start}:{cols.stop}]",
                           src.derive((cols.stop - cols.start,), lambda t: t[cols].contiguous()))


def build(src: HFSource) -> Graph:
    cfg = src.config
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedArchitectureError("gpt2 with scale_attn_by_inverse_layer_idx=True is not supported")
    b = GraphBuilder(src, "GPT2LMHeadModel")
    pre = "transformer." if b.has("transformer.wte.weight") else ""
    hidden, heads, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon
    head_dim = hidden // heads
    scale = default_scale(head_dim) if cfg.scale_attn_weights else 1.0

    ids, pos = b.input("input_ids"), b.input("position_ids")
    x = b.add("embed", b.embedding("wte", ids, f"{pre}wte.weight"), b.embedding("wpe", pos, f"{pre}wpe.weight"))
    for i in range(cfg.n_layer):
        p, ck = f"layers.{i}", f"{pre}h.{i}"
        h = b.layer_norm(f"{p}.ln_1", x, f"{ck}.ln_1.weight", f"{ck}.ln_1.bias", eps)
        qkv: list[Value] = []
        for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
            cols = slice(j * hidden, (j + 1) * hidden)
            w = _conv1d(b, f"{ck}.attn.c_attn.weight", cols)
            qkv.append(b.linear(f"{p}.attn.{n}", h, w, _bias(b, f"{ck}.attn.c_attn.bias", cols)))
        a = b.attention(f"{p}.attn", *qkv, {
            "num_heads": heads, "num_kv_heads": heads, "head_dim": head_dim, "scale": scale,
            "rope": None, "layer_index": i,
        })
        o = b.linear(f"{p}.attn.o_proj", a, _conv1d(b, f"{ck}.attn.c_proj.weight"), b.param(f"{ck}.attn.c_proj.bias"))
        x = b.add(f"{p}.attn_residual", x, o)
        h = b.layer_norm(f"{p}.ln_2", x, f"{ck}.ln_2.weight", f"{ck}.ln_2.bias", eps)
        up = b.linear(f"{p}.mlp.c_fc", h, _conv1d(b, f"{ck}.mlp.c_fc.weight"), b.param(f"{ck}.mlp.c_fc.bias"))
        act = b.activation(f"{p}.mlp.act", up, cfg.activation_function)
        down = b.linear(f"{p}.mlp.c_proj", act, _conv1d(b, f"{ck}.mlp.c_proj.weight"), b.param(f"{ck}.mlp.c_proj.bias"))
        x = b.add(f"{p}.mlp_residual", x, down)
    x = b.layer_norm("final_norm", x, f"{pre}ln_f.weight", f"{pre}ln_f.bias", eps)
    return b.finish(b.linear("lm_head", x, f"{pre}wte.weight"))
