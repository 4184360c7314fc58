"""How far the compiled session's logits are from the reference's on graphs that round activations at run time.

For every tiny architecture and the two attribute sets of ``tests/test_interpreter.py`` that carry
``act_quant`` (plus int8/int4 KV, windows, static/paged storage), prints the compiled session's max
|logit diff| from the reference executor over a prefill and decode steps, beside how far the
reference moves from itself when its activations are jittered by 1e-6 (what an ulp of difference
upstream of a rounding would cost: the kernels' float64-accumulated reductions are what keep the
compiled session off it).  The bar (issue 11, and ``tests/test_interpreter.py``) is 1e-3.  Run::

    python benchmarks/bench_compiled_act_quant.py        # ~7 minutes on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    import test_interpreter as ti
    import torch
    from conftest import ARCHITECTURES, build_tiny_model

    import tokopt
    from tokopt.backends.torch.compiled import CompiledSession
    from tokopt.optimizer.interpret import ReferenceExecutor
    from tokopt.optimizer.interpret.activations import rounding_jitter
    from tokopt.optimizer.pass_api import PassContext

    torch.set_num_threads(1)
    for arch in ARCHITECTURES:
        directory = Path(tempfile.mkdtemp())
        build_tiny_model(arch, directory)
        for variant in ("w8-kv8-static", "w4-kv4-paged"):
            graph = tokopt.load(directory)
            for p in ti.VARIANTS[variant]:
                graph = p.run(graph, PassContext()).graph
            ids = ti.ids_for(graph)
            expected = ti.cached_steps(ReferenceExecutor(graph), ids)
            got = ti.cached_steps(CompiledSession(graph, compile=True, max_len=32), ids)
            diff = float((got - expected).abs().max())
            jittered = []
            for seed in range(3):
                with rounding_jitter(1e-6, seed):
                    jittered.append(float((ti.cached_steps(ReferenceExecutor(graph), ids) - expected).abs().max()))
            bar = max(jittered)
            print(f"{arch:11} {variant:14} compiled max|diff| {diff:.2e} (bar 1e-3)   "
                  f"reference under 1e-6 jitter {bar:.2e}",
                  flush=True)


if __name__ == "__main__":
    main()
