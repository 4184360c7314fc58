"""SmolLM2 decode speed: tokopt's artifacts against the peers' own runtimes, alternating in one process.

The measurement the peers publish: batch 1, greedy, a 9-token prompt, 128 new tokens, the
decode rate after the prompt.  Every round measures every contestant once, in turn, so load
drift hits all alike; medians over ``--rounds`` are printed, with each one's ratio to the
fastest peer.

Contestants (each skipped, with the reason, when what it needs is not installed):

- tokopt artifacts, as a user types them, run by tokopt's session (``tokopt bench``'s loop):
  ``--backend onnxruntime`` fp32 (no passes), ``quantize:bits=8``, ``quantize:bits=4``,
  ``quantize:bits=4,group_size=64``; and ``quantize:bits=4`` for ``--backend torch-compile``;
- onnxruntime-genai's model builder, fp32 and int4 (block 32, accuracy level 4: its CPU
  default), run by onnxruntime-genai's own generator loop — and tokopt's onnxruntime
  artifacts through the same loop (they carry a ``genai_config.json``), so the two sessions'
  per-step overheads are compared on identical directories;
- llama.cpp (``llama-cpp-python``): the shipped Q4_1 GGUF, and Q4_0 / Q8_0 made from it by llama.cpp's own
  quantizer (``llama_model_quantize`` with requantization allowed: it dequantizes to float32 first, so
  these are the formats quantized from the weights every contestant starts from), through its own
  decode loop;
- OpenVINO GenAI: ``$TOKOPT_BENCH_OPENVINO`` names ``optimum-cli export openvino`` output
  directories (``label=DIR,label=DIR``), run by ``openvino_genai.LLMPipeline``.

The llama.cpp and OpenVINO paths use those projects' public generate APIs (decode rate from a
1-token and an N-token run).

Run::

    python benchmarks/bench_peers.py [--rounds 3] [--decode 128] [--ppl] [--only SUBSTR,SUBSTR]

``--ppl`` adds each onnxruntime directory's perplexity on the default eval text
(``tokopt eval``), and each OpenVINO directory's and GGUF's on the same tokens (optimum-intel's
``OVModelForCausalLM`` / llama.cpp's logits of every position, one forward per sequence).  Artifacts are
cached under ``$TOKOPT_BENCH_DIR`` (default ~/.cache/tokopt/bench_peers); the builder's are shared with
``bench_onnxruntime.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench_onnxruntime import builder_int4

CACHE = Path(os.environ.get("TOKOPT_BENCH_DIR", Path.home() / ".cache" / "tokopt" / "bench_peers"))
PROMPT = [1, 504, 3458, 314, 253, 1345, 28, 2219, 30]  # 9 tokens, as the peers' published runs
TOKOPT = {  # label -> (backend, passes)
    "tokopt onnxruntime fp32": ("onnxruntime", ""),
    "tokopt onnxruntime quantize:bits=8": ("onnxruntime", "quantize:bits=8"),
    "tokopt onnxruntime quantize:bits=4": ("onnxruntime", "quantize:bits=4"),
    "tokopt onnxruntime quantize:bits=4,group_size=64": ("onnxruntime", "quantize:bits=4,group_size=64"),
    "tokopt onnxruntime quantize:bits=4,group_size=64,symmetric=false": (
        "onnxruntime", "quantize:bits=4,group_size=64,symmetric=false"),
    "tokopt torch-compile quantize:bits=4": ("torch-compile", "quantize:bits=4"),
}


def tokopt_artifact(label: str) -> Path:
    """The artifact of ``tokopt optimize smollm2 --passes P --backend B`` (parity-checked), cached by recipe."""
    from tokopt.measure.quality import EvalConfig

    backend, passes = TOKOPT[label]
    out = CACHE / label.replace(" ", "_").replace(":", "-").replace("=", "")
    stamp = out / "bench_recipe.txt"
    calib = EvalConfig()  # the default calibration is part of what a user gets: a change rebuilds
    recipe = f"{backend} {passes} calibration {calib.calib_sequences}x{calib.calib_seq_len}"
    if stamp.is_file() and stamp.read_text() == recipe:
        return out
    subprocess.run([sys.executable, "-m", "tokopt", "optimize", "smollm2", "--passes", passes, "--backend", backend,
                    "--speed", "off", "-o", str(out), "--force"], check=True)
    stamp.write_text(recipe)
    return out


def builder_fp32(hf_dir: Path) -> Path:
    """onnxruntime-genai's model builder, fp32 (built once, cached beside the int4 one)."""
    import bench_onnxruntime

    out = bench_onnxruntime.CACHE / "builder_fp32"
    if not (out / "model.onnx").exists():
        builder_int4(hf_dir)  # prepares the shared HF source directory
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                        str(bench_onnxruntime.CACHE / "hf"), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c",
                        str(bench_onnxruntime.CACHE / "builder_cache")], check=True, capture_output=True)
    return out


def tokopt_loop(path: Path, decode: int) -> Callable[[], float]:
    """Decode tok/s of tokopt's own session on ``path`` (greedy, after the 9-token prompt)."""
    import torch

    from tokopt.backends.artifact import load_artifact
    from tokopt.jobs.targets import open_target
    from tokopt.measure.speed import prefill_decode

    session = load_artifact(path) if (path / "tokopt_artifact.json").exists() else open_target(str(path)).session
    return lambda: decode / prefill_decode(session, torch.tensor([PROMPT]), decode)[1]


def genai_loop(path: Path, decode: int) -> Callable[[], float]:
    """Decode tok/s of onnxruntime-genai's generator on ``path``: its own loop, as its users run it."""
    import onnxruntime_genai as og

    model = og.Model(str(path))

    def run() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(PROMPT) + decode, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(PROMPT)  # the prompt's forward
        generator.generate_next_token()  # picks the first token from the prompt's logits
        t0, steps = time.perf_counter(), 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        return steps / (time.perf_counter() - t0)

    return run


def llama_cpp_loop(gguf: Path, decode: int) -> Callable[[], float]:
    """Decode tok/s of llama.cpp on ``gguf``: an N-token and a 1-token greedy completion, the difference."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(PROMPT) + decode + 8, n_threads=os.cpu_count(), verbose=False)

    def timed(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, top_k=1)
        return time.perf_counter() - t0

    return lambda: (decode - 1) / (timed(decode) - timed(1))


LLAMA_CPP_FORMATS = {"Q4_0": 2, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* values


def llama_cpp_gguf(shipped: Path, fmt: str) -> Path:
    """``shipped`` requantized to ``fmt`` by llama.cpp's quantizer (cached)."""
    import ctypes

    import llama_cpp

    out = CACHE / f"smollm2-{fmt}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = LLAMA_CPP_FORMATS[fmt], True, os.cpu_count()
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(shipped).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize to {fmt} failed")
        tmp.rename(out)
    return out


def llama_cpp_files() -> dict[str, Path]:
    """label -> GGUF: the shipped Q4_1 and llama.cpp's requantizations of it (none without llama-cpp-python)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {}
    from tokopt.frontends import demo_model_path

    shipped = demo_model_path("smollm2")
    return {"llama.cpp Q4_1 (the shipped GGUF)": shipped,
            **{f"llama.cpp {fmt}": llama_cpp_gguf(shipped, fmt) for fmt in LLAMA_CPP_FORMATS}}


def llama_cpp_ppl(gguf: Path) -> float:
    """Perplexity of a GGUF under llama.cpp on tokopt's default eval tokens (8 × 512), one pass per sequence."""
    import math

    import numpy as np
    import torch
    from llama_cpp import Llama

    import tokopt
    from tokopt.measure.quality import eval_tokens

    llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, logits_all=True, n_threads=os.cpu_count(),
                verbose=False)
    nll, count = 0.0, 0
    for row in eval_tokens(tokopt.load("smollm2"), 512, 8):
        ids = row.tolist()
        llm.reset()
        llm.eval(ids)
        nll += next_token_nll(torch.from_numpy(np.asarray(llm.scores[: len(ids)])), row)
        count += len(ids) - 1
    return math.exp(nll / count)


def next_token_nll(logits, ids) -> float:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits`` (seq, vocab) of ``ids`` (seq,)."""
    import torch

    lp = torch.log_softmax(logits[:-1].double(), -1)
    return float(-lp.gather(-1, ids[1:].unsqueeze(-1)).sum())


def openvino_loop(path: Path, decode: int) -> Callable[[], float]:
    """Decode tok/s of OpenVINO GenAI's pipeline on ``path``: an N-token and a 1-token greedy run, the difference."""
    import openvino_genai as ov_genai

    pipe = ov_genai.LLMPipeline(str(path), "CPU")
    prompt = "The quick brown fox jumps over the lazy dog, and"

    def timed(n: int) -> float:
        config = ov_genai.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = n
        t0 = time.perf_counter()
        pipe.generate(prompt, config)
        return time.perf_counter() - t0

    return lambda: (decode - 1) / (timed(decode) - timed(1))


def contestants(decode: int, only: list[str]) -> tuple[dict[str, tuple[str, Callable[[], float], Path | None]],
                                                      dict[str, str]]:
    """``label -> (kind, measure, onnxruntime directory or None)`` for what can run here (``only``: the labels
    holding one of these substrings, if any), and the skipped ones."""
    import tokopt

    def wanted(label: str) -> bool:
        return not only or any(part in label for part in only)

    graph = tokopt.load("smollm2")
    hf_dir = Path(graph.meta.tokenizer_path)
    out: dict[str, tuple[str, Callable[[], float], Path | None]] = {}
    skipped: dict[str, str] = {}
    for label in filter(wanted, TOKOPT):
        path = tokopt_artifact(label)
        out[label] = ("tokopt", tokopt_loop(path, decode), path if TOKOPT[label][0] == "onnxruntime" else None)
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    builder_ok = genai and importlib.util.find_spec("onnx_ir") is not None
    if builder_ok:
        for name, make in (("fp32", builder_fp32), ("int4", builder_int4)):
            label = f"onnxruntime-genai builder {name}"
            if wanted(label):
                path = make(hf_dir)
                out[label] = ("peer", genai_loop(path, decode), path)
                out[f"{label}, tokopt's session"] = ("tokopt", tokopt_loop(path, decode), None)
    else:
        skipped["onnxruntime-genai builder"] = "needs onnxruntime-genai and onnx_ir: pip install onnxruntime-genai"
    if genai and wanted("onnxruntime-genai's loop"):  # tokopt's directories through onnxruntime-genai's loop
        for label in [k for k, v in out.items() if v[0] == "tokopt" and v[2] is not None]:
            out[f"{label}, onnxruntime-genai's loop"] = ("tokopt", genai_loop(out[label][2], decode), None)
    if importlib.util.find_spec("llama_cpp") is None:
        skipped["llama.cpp"] = "needs llama-cpp-python (CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)"
    for label, path in llama_cpp_files().items():
        if wanted(label):
            out[label] = ("peer", llama_cpp_loop(path, decode), None)
    ov_dirs = openvino_dirs()
    if importlib.util.find_spec("openvino_genai") is None:
        skipped["OpenVINO GenAI"] = "needs openvino-genai (and optimum-intel to export the model)"
    elif not ov_dirs:
        skipped["OpenVINO GenAI"] = "set TOKOPT_BENCH_OPENVINO=label=DIR,... to optimum-cli export openvino output"
    else:
        for label, path in ov_dirs:
            if wanted(label):
                out[label] = ("peer", openvino_loop(Path(path), decode), None)
    return out, skipped


def openvino_dirs() -> list[tuple[str, str]]:
    """(label, directory) pairs from ``$TOKOPT_BENCH_OPENVINO`` (``label=DIR,label=DIR``)."""
    items = os.environ.get("TOKOPT_BENCH_OPENVINO", "").split(",")
    return [(f"OpenVINO GenAI {k}", v) for k, v in (item.split("=", 1) for item in items if "=" in item)]


def openvino_ppl(path: Path) -> float:
    """Perplexity of an OpenVINO export on tokopt's default eval tokens (8 × 512), one forward per sequence."""
    import math

    import torch
    from optimum.intel import OVModelForCausalLM

    import tokopt
    from tokopt.measure.quality import eval_tokens

    model = OVModelForCausalLM.from_pretrained(str(path))
    nll, count = 0.0, 0
    for row in eval_tokens(tokopt.load("smollm2"), 512, 8):
        ids = row.unsqueeze(0)  # no past: the stateful model starts a new sequence
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        nll += next_token_nll(logits[0], row)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--ppl", action="store_true", help="perplexity of each onnxruntime directory (tokopt eval)")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the contestants whose label "
                                               "holds one (e.g. 'group_size=64,Q4_0')")
    args = ap.parse_args()
    runs, skipped = contestants(args.decode, [part for part in args.only.split(",") if part])
    for _, measure, _ in runs.values():
        measure()  # warm-up: first-call allocations, compilation
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.rounds):
        for label, (_, measure, _) in runs.items():
            rates[label].append(measure())
    median = {label: statistics.median(r) for label, r in rates.items()}
    peers = [median[k] for k, v in runs.items() if v[0] == "peer"]
    best_peer = max(peers) if peers else None
    ppl = {}
    if args.ppl:
        from tokopt.jobs.evaluate import evaluate

        ppl = {label: evaluate(path, progress=False)["ppl"] for label, (_, _, path) in runs.items() if path}
        ppl.update({label: openvino_ppl(Path(path)) for label, path in openvino_dirs() if label in runs})
        ppl.update({label: llama_cpp_ppl(path) for label, path in llama_cpp_files().items() if label in runs})
    from tokopt.measure.machine import describe_machine

    machine = describe_machine()
    print(f"{'runtime / artifact':<66}{'decode tok/s':>13}{'vs best peer':>14}{'ppl':>9}")
    for label in sorted(runs, key=lambda k: -median[k]):
        ratio = f"{median[label] / best_peer:.2f}x" if best_peer else "-"
        print(f"{label:<66}{median[label]:>13.1f}{ratio:>14}{ppl.get(label, float('nan')):>9.3f}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} threads; batch 1, {len(PROMPT)}-token prompt, "
          f"{args.decode} greedy tokens, {args.rounds} alternating rounds, medians")
    print(json.dumps({"decode_tok_s": rates, "median": median, "best_peer": best_peer, "ppl": ppl,
                      "skipped": skipped, "machine": machine, "rounds": args.rounds, "decode": args.decode}))


if __name__ == "__main__":
    main()
