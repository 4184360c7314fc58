"""What one SmolLM2-shaped matrix costs in each MatMulNBits format onnxruntime offers, at batch 1.

The mixed-precision allocator (``quantize:budget_bits=…``) places formats by bytes and estimated KL; on
onnxruntime some formats run on a fast kernel and some do not, and this says which.  One 1536×576
matrix (SmolLM2's gate/up) per session, random codes, every candidate alternating over rounds (medians).
Formats: 4-/8-bit in blocks of 32 and 64 at accuracy level 4 (int8 activations, the target's default
with ``act_bits=8``) and at accuracy 0 (float activations; per-channel int8 runs as two such 4-bit
planes).  Run: ``python benchmarks/bench_matmulnbits_formats.py`` (a minute).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

N, K, ROUNDS, CALLS = 1536, 576, 10, 400
FORMATS = [(4, 32, 4), (4, 64, 4), (8, 32, 4), (8, 64, 4), (4, 32, 0), (8, 32, 0)]  # (bits, block, accuracy)


def session(bits: int, block: int, accuracy: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 255, (N, K // block, block * bits // 8), dtype=np.uint8)
    scales = (rng.random((N, K // block)) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=accuracy)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "S")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def main() -> None:
    sessions = {f: session(*f) for f in FORMATS}
    x = {"x": np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)}
    times: dict[tuple, list[float]] = {f: [] for f in FORMATS}
    for _ in range(ROUNDS):
        for f, s in sessions.items():
            s.run(None, x)
            t0 = time.perf_counter()
            for _ in range(CALLS):
                s.run(None, x)
            times[f].append((time.perf_counter() - t0) / CALLS * 1e6)
    print(f"{'bits':>4} {'block':>5} {'accuracy':>8} {'µs/call':>8}")
    for (bits, block, acc), ts in times.items():
        print(f"{bits:>4} {block:>5} {acc:>8} {statistics.median(ts):>8.1f}")


if __name__ == "__main__":
    main()
