"""Hugging Face ONNX exports with past key values (torch.onnx/optimum) → IR, through the architecture's builder.

The exporters keep each module's path in node names and parameter names on the rest, so the weights are
recovered under their checkpoint names and the frontend builder of the ``config.json`` beside the file
rebuilds the IR; onnxruntime-genai model builder output is handed to :mod:`.genai_builder`.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import torch

from tokopt.errors import ModelSourceError, UnsupportedArchitectureError
from tokopt.frontends.hf.gemma import NORM_OFFSET, NORM_OFFSET_TYPES
from tokopt.frontends.onnx.store import InitializerStore
from tokopt.optimizer.ir.graph import Graph

log = logging.getLogger(__name__)

# where an HF module path starts inside an exporter's node or initializer name
_HF_ROOTS = ("model.", "transformer.", "lm_head")


_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)$")  # GPT-2's Conv1D modules store (in, out) weights


def _hf_name(raw: str) -> str | None:
    """``m.model.layers.0.mlp.up_proj`` (or ``/m/model/layers.0/...``) → ``model.layers.0.mlp.up_proj``."""
    dotted = raw.strip("/").replace("/", ".")
    starts = [dotted.find(root) for root in _HF_ROOTS if dotted.find(root) >= 0
              and (dotted.find(root) == 0 or dotted[dotted.find(root) - 1] == ".")]
    return dotted[min(starts):] if starts else None


def from_hf_export(model, model_path: Path) -> Graph:
    """Recover checkpoint tensors from a torch.onnx/optimum export and build the IR from config.json."""
    from safetensors.torch import save_file

    from tokopt.frontends.hf import load_hf_directory

    config_path = model_path.parent / "config.json"
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    contrib = sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})
    if contrib:
        from tokopt.frontends.onnx.genai_builder import GENAI_CONFIG, is_genai_builder_output, load_genai_builder

        if is_genai_builder_output(model, model_path):
            return load_genai_builder(model, model_path)
        raise UnsupportedArchitectureError(
            f"{model_path}: ONNX decoders built from contrib ops ({', '.join(contrib)}) are recognised only as "
            f"onnxruntime-genai model builder output, with the {GENAI_CONFIG} it writes beside model.onnx; "
            "import the Hugging Face checkpoint it was built from, or a tokopt onnxruntime artifact")
    if "input_ids" not in inputs or "logits" not in outputs:
        raise UnsupportedArchitectureError(
            f"{model_path}: not a decoder export: expected an 'input_ids' input and a 'logits' output, found "
            f"inputs {sorted(inputs)} and outputs {sorted(outputs)}")
    if not config_path.is_file():
        raise ModelSourceError(f"{model_path}: a Hugging Face ONNX export needs its config.json beside it "
                               "(optimum writes one; copy the source model's config.json there)")
    config = json.loads(config_path.read_text())
    store = InitializerStore(model, model_path)
    inits, load = store.inits, store.load
    producers = {o: n for n in model.graph.node for o in n.output}
    tensors: dict[str, torch.Tensor] = {}
    unrecognised: list[str] = []

    def weight_source(name: str) -> tuple[str, bool] | None:
        """(initializer, transposed-in-graph) feeding a MatMul/Gemm input, through a Transpose if any."""
        if name in inits:
            return name, False
        node = producers.get(name)
        if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
            return node.input[0], True
        return None

    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        src = weight_source(node.input[1])
        if src is None:
            continue  # activations × activations (attention scores)
        module = _hf_name(node.name.rsplit("/", 1)[0]) if "/" in node.name else None
        if module is None:
            unrecognised.append(f"{node.op_type} {node.name!r} reading weight {src[0]!r}")
            continue
        w = load(src[0])
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        # the matmul computes x @ W' with W' = (in, out); a Linear weight is (out, in)
        w_in_out = w.t() if (src[1] or trans_b) else w
        conv1d = config.get("model_type") == "gpt2" and _CONV1D.search(module)
        tensors[f"{module}.weight"] = (w_in_out if conv1d else w_in_out.t()).contiguous()
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            tensors[f"{module}.bias"] = load(node.input[2])
    for node in model.graph.node:  # biases added after a MatMul: ".../q_proj/Add"
        if node.op_type == "Add" and "/" in node.name:
            module = _hf_name(node.name.rsplit("/", 1)[0])
            const = [i for i in node.input if i in inits]
            if module and const and f"{module}.weight" in tensors and f"{module}.bias" not in tensors:
                tensors[f"{module}.bias"] = load(const[0])
    for node in model.graph.node:  # norm weights: exporters deduplicate equal initializers, names get lost
        module = _hf_name(node.name.rsplit("/", 1)[0]) if "/" in node.name else None
        if module is None or not re.search(r"(norm|ln_\w+|ln_f)$", module):
            continue
        if node.op_type == "LayerNormalization":
            for role, idx in (("weight", 1), ("bias", 2)):
                if len(node.input) > idx and node.input[idx] in inits:
                    tensors.setdefault(f"{module}.{role}", load(node.input[idx]))
        elif node.op_type == "Mul":
            const = [i for i in node.input if i in inits and len(inits[i].dims) == 1 and inits[i].dims[0] > 1]
            if const:  # Gemma's 1 + w, folded by the exporter into the Mul's constant, comes back as the checkpoint's w
                offset = NORM_OFFSET if config.get("model_type") in NORM_OFFSET_TYPES else 0.0
                tensors.setdefault(f"{module}.weight", load(const[0]) - offset)
    for name in inits:  # parameters the exporter kept by name (embeddings, norms)
        hf = _hf_name(name)
        if hf is not None and hf not in tensors and hf.endswith(("weight", "bias")):
            tensors[hf] = load(name)
    if unrecognised:
        raise UnsupportedArchitectureError(
            f"{model_path}: cannot map these weight-reading nodes to checkpoint parameters (their names carry "
            f"no module path): {'; '.join(unrecognised[:4])}")
    if not tensors:
        raise UnsupportedArchitectureError(f"{model_path}: no parameter of a Hugging Face decoder was recognised")
    work = Path(tempfile.mkdtemp(prefix="tokopt-onnx-"))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "model.safetensors"))
        (work / "config.json").write_text(json.dumps(config))
        for f in model_path.parent.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")):
                (work / f.name).write_bytes(f.read_bytes())
        graph = load_hf_directory(work)
    except ModelSourceError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise UnsupportedArchitectureError(
            f"{model_path}: the export's weights do not form a {config.get('model_type')} checkpoint: {exc}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    # The lazy tensors (and the graphs passes derive from them) read it until the process ends.
    atexit.register(shutil.rmtree, work, True)
    graph.meta.source = str(model_path)
    graph.history = [h.replace("frontend:hf", "frontend:onnx:hf-export") for h in graph.history]
    log.info("imported %s: %d tensors recovered from the ONNX export", model_path, len(tensors))
    return graph
