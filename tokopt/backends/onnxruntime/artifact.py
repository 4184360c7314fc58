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


def hf_config(graph: Graph) -> dict[str, Any]:
    """The source's config.json, with ``architectures`` filled in (GGUF conversions leave it null)."""
    config = dict(graph.meta.hf_config)
    if not config.get("architectures") and graph.meta.architecture:
        config["architectures"] = [graph.meta.architecture]
    return config


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
