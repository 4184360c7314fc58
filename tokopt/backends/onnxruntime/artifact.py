"""Files of the onnxruntime artifact directory besides the model: configs, tokenizer, recipe.

The directory follows tokopt's artifact convention (``tokopt.backends.artifact``: manifest,
atomic write) with one difference: tokenizer files sit next to ``model.onnx``, where
onnxruntime-genai looks for them, and the manifest's ``tokenizer`` entry says ``"."``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from tokopt.optimizer.ir.graph import Graph

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def hf_config(graph: Graph) -> dict[str, Any]:
    """The source's config.json, with ``architectures`` filled in (GGUF conversions leave it null)."""
    config = dict(graph.meta.hf_config)
    if not config.get("architectures") and graph.meta.architecture:
        config["architectures"] = [graph.meta.architecture]
    return config


def copy_tokenizer(graph: Graph, out: Path) -> list[str]:
    src = graph.meta.tokenizer_path
    if not src or not Path(src).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, out / name)
            copied.append(name)
    return copied


def write_json(path: Path, payload: Any) -> str:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path.name


def write_recipe(out: Path, recipe: Any) -> str | None:
    if recipe is None:
        return None
    if isinstance(recipe, (str, Path)) and Path(recipe).is_file():
        shutil.copy2(recipe, out / f"recipe{Path(recipe).suffix or '.yaml'}")
        return f"recipe{Path(recipe).suffix or '.yaml'}"
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return "recipe.yaml"
