"""Backend × attribute: every attribute a pass sets is honoured for real, or refused by name up front.

For each backend and each attribute (set by the real pass on a tiny model), either
- its ``Capabilities`` refuse it, and a ``--dry-run`` of that pipeline fails with exit 2 naming the
  node and the attribute, before any pass runs; or
- the lowered artifact matches the reference executor at a length past the window (the ring wraps),
  and the session's measured KV memory agrees with the IR's figure within 10 % at the model's whole
  context (a static cache: its ``max_len``) — a growing cache reserves whole blocks, so a shorter
  context would compare a block with a few tokens.
No attribute is silently dropped.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tokopt
from tokopt.backends.capabilities import refusals
from tokopt.backends.parity import check_parity
from tokopt.backends.registry import get_backend
from tokopt.errors import BackendRefusalError
from tokopt.jobs.optimize import optimize
from tokopt.measure.agreement import TOLERANCE
from tokopt.optimizer.ir.cost import kv_bytes_for_context
from tokopt.passes.pipeline import Pipeline

BACKENDS = ["torch", "torch-compile", "onnxruntime"]
WINDOW, SINKS = 8, 2
CONTEXT = 3 * WINDOW  # past the window: a bounded cache must have stopped growing

#: attribute -> (tiny architecture that carries it, the pipeline that sets it with real passes)
ARCH_ATTRIBUTES = {
    "qk-norm": ("qwen3", ""),
    "MoE (mixtral)": ("mixtral", ""),
    "MoE + shared expert (qwen2_moe)": ("qwen2_moe", ""),
    "q/k/v bias + per-layer windows (qwen2)": ("qwen2", ""),
    "MoE, no shared expert, norm_topk_prob=False (qwen3_moe)": ("qwen3_moe", ""),
    "attention + final softcap, sandwich norms, Scale (gemma2)": ("gemma2", ""),
    "RoPE per layer type, (1+w) per-head q/k norm (gemma3_text)": ("gemma3_text", ""),
    "LongRoPE + partial rotary (phi3)": ("phi3", ""),
    "NoPE layers (smollm3)": ("smollm3", ""),
    "learned sink logits, clamped-SwiGLU MoE with biases (gpt_oss)": ("gpt_oss", ""),
    "post-norm, q/k norm over the projection (olmo2)": ("olmo2", ""),
    "embedding/residual/logit multipliers (granite)": ("granite", ""),
    "rotated stream, tied lm_head through a float Linear (smollm3, GPTQ int4)":
        ("smollm3", "quantize:bits=4,group_size=16,calibration_samples=2,calibration_seq_len=32"),
}

#: attribute -> the pipeline that sets it on the tiny llama (real passes)
ATTRIBUTES = {
    "window+sinks": f"sparse-attention:window={WINDOW},sinks={SINKS}",
    "window": f"sparse-attention:window={WINDOW},sinks=0",
    "kv int8": "quantize:weights=false,kv_bits=8",
    "kv int4": "quantize:weights=false,kv_bits=4",
    "storage static": "kv-layout:storage=static,max_len=64",
    "storage paged": "kv-layout:storage=paged,block_size=4",
    "layout BSNH": "kv-layout:layout=BSNH",
    "weights int8 per-channel": "quantize:bits=8,method=rtn",
    "weights int4 g16": "quantize:bits=4,group_size=16,method=rtn",
    "weights int4 g16 asym": "quantize:bits=4,group_size=16,method=rtn,symmetric=false",
    "act_quant 8": "quantize:bits=4,group_size=16,method=rtn,act_bits=8",
    "weights mixed int4/int8 + act_quant": "quantize:bits=4,group_size=16,method=rtn,budget_bits=7,act_bits=8",
}


def _usable(name: str) -> bool:
    try:
        return get_backend(name).availability()[0]
    except Exception:  # noqa: BLE001 - not registered or not installable here
        return False


def _kv_context(graph) -> int:
    """The model's whole context, or the smallest static cache's ``max_len``: where a block-grown and a
    reserved cache both hold exactly what the IR says."""
    static = [n.attrs["kv_cache"]["max_len"] for n in graph.nodes("Attention")
              if n.attrs["kv_cache"].get("storage") == "static" and n.attrs["kv_cache"].get("max_len")]
    return min([graph.meta.max_positions, *static])


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tokopt.load(tiny_model_dir("llama")[0])


@pytest.mark.parametrize("attribute", [*ATTRIBUTES, *ARCH_ATTRIBUTES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_honours_or_refuses(backend, attribute, llama, tiny_model_dir, tmp_path):
    if not _usable(backend) or (backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None):
        pytest.skip(f"backend {backend} is not usable here")
    if attribute in ARCH_ATTRIBUTES:
        arch, spec = ARCH_ATTRIBUTES[attribute]
        model = tokopt.load(tiny_model_dir(arch)[0])
    else:
        model, spec = llama, ATTRIBUTES[attribute]
    graph = Pipeline.parse(spec).run(model)
    b = get_backend(backend)
    refused = refusals(graph, b.capabilities())
    if refused:
        node = refused[0].split(":")[0]
        with pytest.raises(BackendRefusalError, match=rf"{node}: "):
            optimize(model, spec, backend=backend, out=tmp_path / "o", dry_run=True)
        return
    artifact = b.lower(graph, tmp_path / "art", parity=False)
    session = b.load(artifact.path)
    ids = torch.randint(0, graph.meta.vocab_size, (1, CONTEXT), generator=torch.Generator().manual_seed(0))
    report = check_parity(graph, session, tokens=ids[:, : CONTEXT // 2], decode_steps=CONTEXT // 2,
                          label=f"{backend}/{attribute}")
    assert report.passed
    context = _kv_context(graph)
    long = torch.randint(0, graph.meta.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    cache = session.new_cache(1)
    with torch.inference_mode():
        session.forward(long, cache)
    measured, analytic = session.kv_nbytes(cache), kv_bytes_for_context(graph, context)
    assert abs(measured / analytic - 1) <= TOLERANCE, (backend, attribute, measured, analytic)
