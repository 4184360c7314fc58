"""onnxruntime-genai *model builder* output → IR, for llama-family decoders.

The builder (``python -m onnxruntime_genai.models.builder``) writes ``model.onnx`` made of
onnxruntime contrib ops (``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization``,
``MatMulNBits``, ``GatherBlockQuantized``), a ``genai_config.json`` and the tokenizer, but
no ``config.json``.  Its node and initializer names still follow the Hugging Face module
tree (``/model/layers.0/attn/qkv_proj/MatMul_Q4``), so — as for torch.onnx exports — the
importer does not pattern-match attention math: it

1. classifies every node by its module path and op (plumbing, embedding, norm, linear,
   attention, activation) and refuses, by name, any node outside that vocabulary (a
   ``q_norm``, a ``FastGelu``, a ``RotaryEmbedding`` …), so nothing is silently dropped;
2. recovers each parameter under its checkpoint name — fp32 ``MatMul`` weights
   transposed to ``(out, in)``, packed ``qkv_proj`` rows split into q/k/v, and
   ``MatMulNBits`` weights as exact :class:`QuantizedWeight` values (the same codes and
   scales, never a dequantize/requantize round trip), a ``GatherBlockQuantized``
   embedding reading the lm_head's tensors as the *same* parameter;
3. writes the config the builder dropped, from ``genai_config.json`` plus what only the
   graph knows (intermediate size, norm epsilon, tying, RoPE frequencies), and lets the
   architecture's own frontend builder (:mod:`tokopt.frontends.hf`) build the IR;
4. copies onto the IR what the builder decided per node: the RoPE frequencies read back
   from the ``cos_cache``/``sin_cache`` it baked (exact whatever scaling recipe produced
   them), attention scale and window, and ``act_quant`` for ``MatMulNBits`` run at
   ``accuracy_level=4`` (int8 activations per weight block: what onnxruntime computes, so
   the reference executor models the file, not an idealised fp32 version of it).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokopt.errors import ModelSourceError, UnsupportedArchitectureError
from tokopt.frontends.onnx.store import InitializerStore, restore_nbits
from tokopt.optimizer.corpus import has_tokenizer
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.ir.weights import LazyTensor, QuantizedWeight, Weight

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"

# genai_config "model.type" → (HF model_type, architecture); each has a tokopt frontend builder
_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# accuracy level 4 = int8 activations quantized per weight block (tokopt.optimizer.interpret.activations)
_INT8_ACCURACY = 4

# (module path pattern, ops allowed there, role).  The module path is the node name minus its
# last component, dotted: "/model/layers.0/attn/qkv_proj/MatMul_Q4" → "model.layers.0.attn.qkv_proj".
_RULES: list[tuple[re.Pattern[str], frozenset[str], str]] = [
    (re.compile(r"model\.(attn_mask_reformat(\..*)?|constant_nodes(\..*)?)"),
     frozenset({"Constant", "ReduceSum", "Sub", "Cast", "Shape", "Gather"}), "plumbing"),
    (re.compile(r"model\.embed_tokens"), frozenset({"Gather", "GatherBlockQuantized", "Reshape", "Transpose"}),
     "embedding"),
    (re.compile(r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm|final_norm_layernorm)"),
     frozenset({"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}), "norm"),
    (re.compile(r"model\.layers\.\d+\.attn\.(qkv_proj|q_proj|k_proj|v_proj|o_proj)"),
     frozenset({"MatMul", "MatMulNBits", "Add"}), "linear"),
    (re.compile(r"model\.layers\.\d+\.attn"), frozenset({"GroupQueryAttention"}), "attention"),
    (re.compile(r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"),
     frozenset({"MatMul", "MatMulNBits", "Add"}), "linear"),
    (re.compile(r"model\.layers\.\d+\.mlp\.act_fn"), frozenset({"Sigmoid", "Mul"}), "silu"),
    (re.compile(r"model\.layers\.\d+\.mlp"), frozenset({"Mul"}), "gate"),
    (re.compile(r"lm_head"), frozenset({"MatMul", "MatMulNBits", "Add"}), "linear"),
]
# GroupQueryAttention attributes whose meaning the importer checks or models (sliding_window_cache only sizes buffers)
_GQA_ATTRS = frozenset({"num_heads", "kv_num_heads", "scale", "local_window_size", "softcap", "do_rotary",
                        "rotary_interleaved", "smooth_softmax", "k_quant_type", "v_quant_type", "sliding_window_cache"})
_SUPPORTED = ("a token Gather/GatherBlockQuantized, (Skip)SimplifiedLayerNormalization norms, "
              "MatMul/MatMulNBits projections (packed or separate q/k/v), GroupQueryAttention with its "
              "rotary caches, a Sigmoid*x (SiLU) gated MLP and an lm_head")


def is_genai_builder_output(model: Any, model_path: Path) -> bool:
    """Contrib ops and a genai_config.json beside the file: what the model builder writes."""
    return (model_path.parent / GENAI_CONFIG).is_file() and any(n.domain == "com.microsoft"
                                                               for n in model.graph.node)


@dataclass
class _Scan:
    """What the node walk found, before any tensor is read."""

    roles: dict[str, list[Any]] = field(default_factory=dict)  # role -> nodes
    unrecognised: list[str] = field(default_factory=list)


def _module(node_name: str) -> str:
    parts = node_name.strip("/").split("/")
    return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]


def _describe(node: Any) -> str:
    return f"{node.domain or 'ai.onnx'}::{node.op_type} {node.name!r}"


def _scan(model: Any) -> _Scan:
    scan = _Scan()
    for node in model.graph.node:
        module = _module(node.name)
        for pattern, ops, role in _RULES:
            if pattern.fullmatch(module):
                if node.op_type in ops:
                    scan.roles.setdefault(role, []).append(node)
                else:
                    scan.unrecognised.append(_describe(node))
                break
        else:
            scan.unrecognised.append(_describe(node))
    return scan


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _checkpoint_module(module: str) -> str:
    """Builder module path → HF checkpoint module: ``model.layers.0.attn.o_proj`` → ``...self_attn.o_proj``."""
    return re.sub(r"^(model\.layers\.\d+)\.attn\.", r"\1.self_attn.", module)


class _Importer:
    """One builder directory being read: initializers on demand, parameters by checkpoint name."""

    def __init__(self, model: Any, model_path: Path) -> None:
        self.model = model
        self.path = model_path
        self.store = InitializerStore(model, model_path)
        self.inits = self.store.inits
        self.producers = {o: n for n in model.graph.node for o in n.output}
        self.tensors: dict[str, Weight] = {}
        self.accuracy: dict[str, tuple[int, int, int]] = {}  # param -> (accuracy_level, block, K)
        self._quantized: dict[tuple[str, int, int], QuantizedWeight] = {}

    # -- initializers ------------------------------------------------------------------
    def stored(self, name: str) -> LazyTensor:
        if name not in self.inits:
            raise UnsupportedArchitectureError(
                f"{self.path}: expected an initializer for {name!r} (weights computed at run time are not "
                "recognised)")
        return self.store.lazy(name)

    def load(self, name: str) -> torch.Tensor:
        return self.stored(name).materialize()

    # -- weights -----------------------------------------------------------------------
    def dense_weight(self, node: Any, rows: tuple[int, int] | None) -> LazyTensor:
        """A fp MatMul's (K, N) initializer as the Linear's (N, K) weight, rows sliced for packed q/k/v."""
        src = self.stored(node.input[1])
        if len(src.shape) != 2:
            raise UnsupportedArchitectureError(f"{self.path}: {_describe(node)} reads a {len(src.shape)}-D weight")
        lo, hi = rows or (0, src.shape[1])
        return src.derive((hi - lo, src.shape[0]), lambda t: t[:, lo:hi].t().contiguous())

    def nbits_weight(self, node: Any, rows: tuple[int, int] | None) -> QuantizedWeight:
        """MatMulNBits' (B, scales, zero_points) as the QuantizedWeight holding the same codes."""
        a = _attrs(node)
        if len(node.input) > 4 and node.input[4]:
            raise UnsupportedArchitectureError(f"{self.path}: {_describe(node)} has a g_idx (act-order) input; "
                                               "only weights grouped in input order are supported")
        n, k, bits, block = int(a["N"]), int(a["K"]), int(a["bits"]), int(a["block_size"])
        lo, hi = rows or (0, n)
        key = (node.input[1], lo, hi)
        if key not in self._quantized:
            zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
            scales = self.stored(node.input[2])
            entry = {"shape": [hi - lo, k], "bits": bits, "group_size": block, "rows": [lo, hi],
                     "B": node.input[1], "scales": node.input[2], "zero_points": zp, "scale_dtype": scales.dtype,
                     "extra": {"source": "onnxruntime-genai model builder"}}
            stored = self._reshaped_scales(n, math.ceil(k / block))
            self._quantized[key] = restore_nbits(entry, stored)
        return self._quantized[key]

    def _reshaped_scales(self, n: int, k_blocks: int):
        """``stored`` that views flat (N*k_blocks,) scales / zero points as rows, as restore_nbits slices them."""

        def stored(name: str) -> LazyTensor:
            t = self.stored(name)
            if len(t.shape) == 1 and t.shape[0] % n == 0:
                return t.derive((n, t.shape[0] // n), lambda x: x.reshape(n, -1))
            return t

        return stored

    def linear(self, module: str, node: Any, rows: tuple[int, int] | None = None) -> Weight:
        if node.op_type == "MatMulNBits":
            w = self.nbits_weight(node, rows)
            a = _attrs(node)
            self.accuracy[f"{module}.weight"] = (int(a.get("accuracy_level", 0)), w.group_size, w.shape[1])
            if len(node.input) > 5 and node.input[5]:
                bias = self.stored(node.input[5])
                lo, hi = rows or (0, bias.shape[0])
                self.tensors[f"{module}.bias"] = bias.derive((hi - lo,), lambda t: t[lo:hi].contiguous())
        else:
            if node.input[1] not in self.inits:
                raise UnsupportedArchitectureError(
                    f"{self.path}: {_describe(node)} multiplies by {node.input[1]!r}, not by a weight initializer")
            w = self.dense_weight(node, rows)
        self.tensors[f"{module}.weight"] = w
        return w

    def bias(self, module: str, node: Any, rows: tuple[int, int] | None = None) -> None:
        const = [i for i in node.input if i in self.inits]
        if len(const) != 1:
            raise UnsupportedArchitectureError(f"{self.path}: {_describe(node)} is not a bias add (x + constant)")
        b = self.stored(const[0])
        lo, hi = rows or (0, b.shape[-1])
        self.tensors[f"{module}.bias"] = b.derive((hi - lo,), lambda t: t.reshape(-1)[lo:hi].contiguous())


def load_genai_builder(model: Any, model_path: Path) -> Graph:
    """Read onnxruntime-genai model builder output (``model.onnx`` + ``genai_config.json``) into a Graph."""
    from tokopt.frontends.hf import ARCHITECTURES
    from tokopt.frontends.hf.builder import HFSource

    try:
        genai = json.loads((model_path.parent / GENAI_CONFIG).read_text())
        mcfg, dcfg = genai["model"], genai["model"]["decoder"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelSourceError(f"{model_path.parent / GENAI_CONFIG} is not an onnxruntime-genai config "
                               f"({type(exc).__name__}: {exc})") from None
    model_type = mcfg.get("type")
    if model_type not in _TYPES:
        raise UnsupportedArchitectureError(
            f"{model_path}: onnxruntime-genai model type {model_type!r} is not supported for import; supported: "
            f"{', '.join(sorted(_TYPES))} (or import the Hugging Face checkpoint it was built from)")
    scan = _scan(model)
    if scan.unrecognised:
        more = f" (and {len(scan.unrecognised) - 5} more)" if len(scan.unrecognised) > 5 else ""
        raise UnsupportedArchitectureError(
            f"{model_path}: onnxruntime-genai builder output with nodes tokopt cannot map to a {model_type} "
            f"decoder: {'; '.join(scan.unrecognised[:5])}{more}. Recognised: {_SUPPORTED}")
    imp = _Importer(model, model_path)
    heads, kv_heads = int(dcfg["num_attention_heads"]), int(dcfg["num_key_value_heads"])
    head_dim = int(dcfg.get("head_size") or dcfg["hidden_size"] // heads)
    layers = int(dcfg["num_hidden_layers"])
    hidden = int(dcfg["hidden_size"])
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    split = {"q_proj": (0, q_rows), "k_proj": (q_rows, q_rows + kv_rows),
             "v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows)}

    def parts(module: str) -> list[tuple[str, tuple[int, int] | None]]:
        """Checkpoint module(s) a builder module holds: a packed qkv_proj is three."""
        ck = _checkpoint_module(module)
        if ck.endswith(".qkv_proj"):
            return [(ck.removesuffix("qkv_proj") + name, rows) for name, rows in split.items()]
        return [(ck, None)]

    for node in scan.roles.get("linear", []):
        module = _module(node.name)
        for ck, rows in parts(module):
            if node.op_type == "Add":
                imp.bias(ck, node, rows)
            else:
                imp.linear(ck, node, rows)
                if rows is not None and imp.tensors[f"{ck}.weight"].shape[0] != rows[1] - rows[0]:
                    raise UnsupportedArchitectureError(f"{model_path}: {_describe(node)}: packed q/k/v rows do not "
                                                       f"match {heads} heads, {kv_heads} kv heads of {head_dim}")
    eps = _norms(imp, scan, layers)
    tied = _embedding(imp, scan)
    rope, attn = _attention(imp, scan, layers, heads, kv_heads, head_dim)

    missing = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(layers) for p in
               ("q_proj", "k_proj", "v_proj", "o_proj") if f"model.layers.{i}.self_attn.{p}.weight" not in imp.tensors]
    missing += [f"model.layers.{i}.mlp.{p}.weight" for i in range(layers) for p in
                ("gate_proj", "up_proj", "down_proj") if f"model.layers.{i}.mlp.{p}.weight" not in imp.tensors]
    if "lm_head.weight" not in imp.tensors:
        missing.append("lm_head.weight")
    if missing:
        raise UnsupportedArchitectureError(f"{model_path}: builder output lacks the projections "
                                           f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    if len(scan.roles.get("silu", [])) != 2 * layers or len(scan.roles.get("gate", [])) != layers:
        raise UnsupportedArchitectureError(f"{model_path}: expected one Sigmoid*x (SiLU) and one gating Mul per "
                                           "layer's MLP; found another activation pattern")
    vocab = imp.tensors["lm_head.weight"].shape[0]
    if int(mcfg.get("vocab_size", vocab)) != vocab:
        log.warning("%s: genai_config vocab_size %s, lm_head has %d rows; using the lm_head's", model_path,
                    mcfg.get("vocab_size"), vocab)
    attention_bias, mlp_bias = _fill_biases(imp, model_type, layers, model_path)
    windows = sorted({w for w in attn.values() if w}) or [None]
    config_kwargs: dict[str, Any] = dict(
        architectures=[_TYPES[model_type]], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=imp.tensors["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int(mcfg.get("context_length") or rope["positions"]), rms_norm_eps=eps,
        rope_theta=rope["theta"], tie_word_embeddings=tied, hidden_act="silu",
        bos_token_id=mcfg.get("bos_token_id"), eos_token_id=mcfg.get("eos_token_id"),
        pad_token_id=_token_id(mcfg.get("pad_token_id"), vocab), sliding_window=windows[-1],
    )
    if model_type == "llama":
        config_kwargs.update(attention_bias=attention_bias, mlp_bias=mlp_bias)
    if model_type == "qwen2":
        config_kwargs.update(use_sliding_window=windows[-1] is not None)
    if tied:
        imp.tensors["model.embed_tokens.weight"] = imp.tensors.pop("lm_head.weight")
        imp.accuracy["model.embed_tokens.weight"] = imp.accuracy.pop("lm_head.weight", (0, 0, 0))
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **config_kwargs)
    src = HFSource(model_path.parent, config, config.to_dict(), imp.tensors)  # type: ignore[arg-type]
    graph = ARCHITECTURES[model_type](src)
    _apply_node_attrs(graph, imp, rope, attn, model_path)
    graph.meta.source = str(model_path)
    graph.meta.tokenizer_path = str(model_path.parent) if has_tokenizer(model_path.parent) else None
    graph.history = [h.replace("frontend:hf", "frontend:onnx:genai-builder") for h in graph.history]
    n_quant = sum(isinstance(w, QuantizedWeight) for w in graph.params.values())
    log.info("imported %s (onnxruntime-genai builder, %s): %d parameters, %d quantized", model_path,
             model_type, len(graph.params), n_quant)
    return graph


def _token_id(value: Any, vocab: int) -> int | None:
    """The builder writes pad = vocab_size for models without one; HF configs want None there."""
    return value if isinstance(value, int) and 0 <= value < vocab else None


def _norms(imp: _Importer, scan: _Scan, layers: int) -> float:
    """Norm weights under their checkpoint names; returns the one epsilon they share."""
    eps: set[float] = set()
    for node in scan.roles.get("norm", []):
        module = _module(node.name)
        skip = node.op_type == "SkipSimplifiedLayerNormalization"
        if skip and len(node.input) > 3 and node.input[3]:
            raise UnsupportedArchitectureError(f"{imp.path}: {_describe(node)} adds a bias; RMSNorm has none")
        weight = node.input[2 if skip else 1]
        name = "model.norm" if module.endswith("final_norm_layernorm") else module
        if module.endswith("final_norm_layernorm") and module != f"model.layers.{layers}.final_norm_layernorm":
            raise UnsupportedArchitectureError(f"{imp.path}: final norm {node.name!r} is not after layer {layers - 1}")
        imp.tensors[f"{name}.weight"] = imp.stored(weight)
        # the attribute is a float32: its shortest str is the config's value (1e-06, not 9.99999997e-07)
        eps.add(float(str(np.float32(_attrs(node).get("epsilon", 1e-5)))))
    if len(eps) != 1:
        raise UnsupportedArchitectureError(f"{imp.path}: norms use epsilons {sorted(eps)}; expected one")
    return eps.pop()


def _embedding(imp: _Importer, scan: _Scan) -> bool:
    """The token table: a Gather of a float table, or GatherBlockQuantized.  Returns whether it is the lm_head's."""
    nodes = {n.op_type: n for n in scan.roles.get("embedding", [])}
    if "GatherBlockQuantized" in nodes:
        node = nodes["GatherBlockQuantized"]
        a = _attrs(node)
        if int(a.get("gather_axis", 0)) != 0 or int(a.get("quantize_axis", 1)) != 1:
            raise UnsupportedArchitectureError(f"{imp.path}: {_describe(node)} gathers/quantizes along axes "
                                               f"{a.get('gather_axis')}/{a.get('quantize_axis')}; expected 0/1")
        data = node.input[0]
        producer = imp.producers.get(data)
        if producer is not None and producer.op_type == "Reshape":
            data = producer.input[0]
        zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
        head = next((n for n in scan.roles.get("linear", []) if _module(n.name) == "lm_head"), None)
        if head is not None and head.op_type == "MatMulNBits" and head.input[1] == data \
                and head.input[2] == node.input[2] and (head.input[3] if len(head.input) > 3 else "") == (zp or ""):
            return True  # the lm_head's codes and scales: one parameter
        imp.tensors["model.embed_tokens.weight"] = _gathered_table(imp, node, data, zp, a)
        return False
    node = nodes.get("Gather")
    if node is None:
        raise UnsupportedArchitectureError(f"{imp.path}: no token embedding (Gather/GatherBlockQuantized on "
                                           "input_ids) under /model/embed_tokens")
    table, producer = node.input[0], imp.producers.get(node.input[0])
    transposed = producer is not None and producer.op_type == "Transpose"
    if transposed:  # a tied fp model gathers rows of the lm_head's (K, N) MatMul weight, transposed
        if list(_attrs(producer).get("perm", [1, 0])) != [1, 0]:
            raise UnsupportedArchitectureError(f"{imp.path}: {_describe(producer)} is not a 2-D transpose")
        table = producer.input[0]
        head = next((n for n in scan.roles.get("linear", []) if _module(n.name) == "lm_head"), None)
        if head is not None and head.op_type == "MatMul" and head.input[1] == table:
            return True
    stored = imp.stored(table)
    if len(stored.shape) != 2:
        raise UnsupportedArchitectureError(f"{imp.path}: {_describe(node)} reads a {len(stored.shape)}-D table")
    imp.tensors["model.embed_tokens.weight"] = (
        stored.derive(stored.shape[::-1], lambda t: t.t().contiguous()) if transposed else stored)
    return False


def _gathered_table(imp: _Importer, node: Any, data: str, zp: str | None, attrs: dict[str, Any]) -> QuantizedWeight:
    """A quantized embedding of its own (not the lm_head's): GatherBlockQuantized's uint8 codes + scales."""
    bits, block = int(attrs.get("bits", 4)), int(attrs.get("block_size", 128))
    raw = imp.load(data)
    if raw.dtype != torch.uint8:
        raise UnsupportedArchitectureError(f"{imp.path}: {_describe(node)} reads {raw.dtype} codes; expected uint8")
    rows = raw.shape[0]
    packed = raw.reshape(rows, -1).contiguous()
    cols = packed.shape[1] * 8 // bits
    scales = imp.load(node.input[2]).reshape(rows, -1).contiguous()
    zeros = None
    if zp is not None:
        z = imp.load(zp).reshape(rows, -1)
        zeros = (torch.stack([z & 0x0F, z >> 4], dim=-1).reshape(rows, -1) if bits == 4 else z)[:, :scales.shape[1]]
        zeros = zeros.contiguous()
    return QuantizedWeight(packed, scales, zeros, bits, block, (rows, cols), "rtn",
                           {"source": "onnxruntime-genai model builder"})


def _attention(imp: _Importer, scan: _Scan, layers: int, heads: int, kv_heads: int,
               head_dim: int) -> tuple[dict[str, Any], dict[int, int | None]]:
    """RoPE read from the rotary caches, and each layer's window, from the GroupQueryAttention nodes."""
    nodes = scan.roles.get("attention", [])
    if len(nodes) != layers:
        raise UnsupportedArchitectureError(f"{imp.path}: {len(nodes)} GroupQueryAttention nodes for {layers} layers")
    windows: dict[int, int | None] = {}
    caches: set[tuple[str, str]] = set()
    for node in nodes:
        a = _attrs(node)
        layer = int(re.search(r"layers\.(\d+)", node.name).group(1))  # type: ignore[union-attr]
        problems = []
        if int(a.get("num_heads", 0)) != heads or int(a.get("kv_num_heads", 0)) != kv_heads:
            problems.append(f"heads {a.get('num_heads')}/{a.get('kv_num_heads')} (genai_config: {heads}/{kv_heads})")
        if not int(a.get("do_rotary", 0)):
            problems.append("do_rotary=0 (RoPE outside the op)")
        if int(a.get("rotary_interleaved", 0)):
            problems.append("rotary_interleaved=1")
        if float(a.get("softcap", 0.0)):
            problems.append(f"softcap={a['softcap']}")
        scale = float(a.get("scale", 0.0))
        if scale and not math.isclose(scale, 1 / math.sqrt(head_dim), rel_tol=1e-6):
            problems.append(f"scale {scale} (not 1/sqrt(head_size))")
        if int(a.get("smooth_softmax", 0)):
            problems.append("smooth_softmax=1")
        if a.get("k_quant_type") or a.get("v_quant_type"):
            problems.append(f"a quantized KV cache ({a.get('k_quant_type')}/{a.get('v_quant_type')})")
        unknown = sorted(set(a) - _GQA_ATTRS)
        if unknown:
            problems.append(f"attributes {unknown}")
        extra = [i for i, name in enumerate(node.input) if name and i >= 9]
        if extra:
            problems.append(f"inputs {extra} (position ids / attention bias / sinks)")
        if len(node.input) < 9 or not node.input[7] or not node.input[8]:
            problems.append("no cos_cache/sin_cache inputs")
        if problems:
            raise UnsupportedArchitectureError(f"{imp.path}: {_describe(node)}: unsupported {'; '.join(problems)}")
        caches.add((node.input[7], node.input[8]))
        window = int(a.get("local_window_size", -1))
        windows[layer] = window if window > 0 else None
    if len(caches) != 1:
        raise UnsupportedArchitectureError(f"{imp.path}: layers use different rotary caches {sorted(caches)}")
    cos_name, sin_name = caches.pop()
    return _rope_from_caches(imp.load(cos_name), imp.load(sin_name), head_dim, imp.path), windows


def _rope_from_caches(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, path: Path) -> dict[str, Any]:
    """Inverse frequencies (and attention factor) of the rotation the caches tabulate.

    Row ``p`` holds ``factor * cos(p * inv_freq)``: the angle's slope over positions, fitted
    on the unwrapped ``atan2`` of every row, recovers ``inv_freq`` to far below float32
    resolution whatever recipe (default, linear, llama3, yarn) produced it.
    """
    c, s = cos.double().numpy(), sin.double().numpy()
    if c.ndim != 2 or c.shape != s.shape or c.shape[0] < 2:
        raise UnsupportedArchitectureError(f"{path}: rotary caches of shape {tuple(cos.shape)}/{tuple(sin.shape)}; "
                                           "expected (positions, rotary_dim/2)")
    rows = min(c.shape[0], 4096)
    angles = np.unwrap(np.arctan2(s[:rows], c[:rows]), axis=0)
    pos = np.arange(rows, dtype=np.float64)[:, None]
    slope = (pos * angles).sum(0) / (pos * pos).sum()
    residual = float(np.abs(angles - pos * slope).max())
    factor = np.hypot(c[:rows], s[:rows])
    if residual > 1e-3 or float(factor.max() - factor.min()) > 1e-5:
        raise UnsupportedArchitectureError(
            f"{path}: the rotary caches are not one fixed-frequency rotation (angle residual {residual:.2g}); "
            "position-dependent scalings (longrope/dynamic) are not supported")
    inv_freq = torch.from_numpy(slope).float()
    rotary_dim = 2 * int(inv_freq.numel())
    if rotary_dim > head_dim:
        raise UnsupportedArchitectureError(f"{path}: rotary caches cover {rotary_dim} dims, head size is {head_dim}")
    theta = float(inv_freq[1].double() ** (-rotary_dim / 2)) if rotary_dim > 2 else 10000.0
    theta = float(f"{theta:.6g}")
    default = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    is_default = bool(torch.allclose(default, inv_freq, rtol=1e-5, atol=0))
    if not is_default:  # llama3/yarn/linear…: the frequencies are exact, the config's theta only indicative
        log.info("%s: RoPE frequencies are not theta**(-2i/d) for any theta (a scaled RoPE); the IR takes them "
                 "from the rotary caches as they are", path)
    return {"theta": theta, "type": "default" if is_default else "builder_cache", "rotary_dim": rotary_dim,
            "interleaved": False, "inv_freq": [float(f) for f in inv_freq],
            "attention_factor": float(np.float32(factor[0, 0])), "positions": int(c.shape[0])}


def _fill_biases(imp: _Importer, model_type: str, layers: int, path: Path) -> tuple[bool, bool]:
    """The builder drops all-zero biases; give the architecture the zeros its layout expects."""
    attn = [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "k_proj", "v_proj")]
    out = [f"model.layers.{i}.self_attn.o_proj" for i in range(layers)]
    mlp = [f"model.layers.{i}.mlp.{p}" for i in range(layers) for p in ("gate_proj", "up_proj", "down_proj")]
    has = {m for m in attn + out + mlp + ["lm_head"] if f"{m}.bias" in imp.tensors}
    if "lm_head" in has:
        raise UnsupportedArchitectureError(f"{path}: the lm_head adds a bias; {model_type} has none")
    if model_type == "llama":
        attention_bias, mlp_bias = bool(has & set(attn + out)), bool(has & set(mlp))
        need = (attn + out if attention_bias else []) + (mlp if mlp_bias else [])
    else:
        extra = sorted(has - set(attn))
        if extra:
            raise UnsupportedArchitectureError(f"{path}: {model_type} has biases on q/k/v only; found {extra[0]}.bias")
        attention_bias, mlp_bias = bool(has), False
        need = attn if model_type == "qwen2" else []
        if model_type == "mistral" and has:
            raise UnsupportedArchitectureError(f"{path}: mistral has no projection biases; found {sorted(has)[0]}")
    for m in need:
        if f"{m}.bias" not in imp.tensors:
            rows = imp.tensors[f"{m}.weight"].shape[0]
            imp.tensors[f"{m}.bias"] = LazyTensor((rows,), "float32", lambda r=rows: torch.zeros(r))
    return attention_bias, mlp_bias


def _apply_node_attrs(graph: Graph, imp: _Importer, rope: dict[str, Any], windows: dict[int, int | None],
                      path: Path) -> None:
    """What the builder decided per node, copied onto the IR built from the synthetic config."""
    rope_attrs = {k: v for k, v in rope.items() if k != "positions"}
    for node in graph.nodes("Attention"):
        node.attrs["rope"] = dict(rope_attrs)
        node.attrs["window"] = windows[int(node.attrs["layer_index"])]
    for node in graph.nodes("Linear"):
        level, block, k = imp.accuracy.get(node.params["weight"], (0, 0, 0))
        if level == _INT8_ACCURACY:
            if k % block:
                log.warning("%s: %s runs with int8 activations in blocks of %d that do not divide K=%d; the IR "
                            "keeps fp32 activations for it", path, node.name, block, k)
                continue
            node.attrs["act_quant"] = {"bits": 8, "block": block}
        elif level in (2, 3):  # 1 is fp32; 0 lets the kernel choose and is fp32 on CPU
            log.info("%s: %s has MatMulNBits accuracy_level=%d (fp16/bf16 compute where the hardware has it); "
                     "modelled as fp32", path, node.name, level)
    graph.reinfer()
