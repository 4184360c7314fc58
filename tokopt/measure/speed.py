"""Prefill and decode speed of a session, at batch 1 and at a batch, and its peak memory.

Measured on whatever implements the session interface (``new_cache``/``forward``) —
the reference executor or a backend's loaded artifact — with the same synthetic prompt
ids for every stage, greedy decoding through the KV cache, one warm-up round first.
Peak memory is the process's resident-set high-water mark during the measurement
(Linux: ``VmHWM``, reset before it starts), so run it in a fresh process to attribute
the whole figure to one model (``python -m tokopt.measure.speed ARTIFACT``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokopt.backends.base import new_cache
from tokopt.interrupts import deferred_interrupts
from tokopt.optimizer.ir.cost import DEFAULT_CONTEXTS

if TYPE_CHECKING:
    from tokopt.optimizer.ir.graph import Graph

log = logging.getLogger(__name__)

PEER_PROMPT = 9  # tokens of the prompt in the measurement llama.cpp, onnxruntime-genai and OpenVINO publish
KV_CHUNK = 128  # prefill chunk while measuring KV memory (bounded activations, as a server would)


@dataclass(frozen=True)
class SpeedConfig:
    prompt_len: int = 128
    decode_tokens: int = 32
    batch_size: int = 4
    seed: int = 0
    threads: int = 0  # torch intra-op threads while measuring; 0 = torch's default (all cores)
    kv_context: int = 2048  # the session's KV memory is measured at the report's contexts up to this (0: off)
    #: the peers' published measurement: batch 1, a PEER_PROMPT-token prompt, this many greedy tokens (0: off)
    peer_decode_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def lean(self) -> SpeedConfig:
        """The measurement for a model past the memory budget: batch 1, no separate KV-memory measurement.

        The artifact's session then holds its weights and one short sequence's cache: on a
        Llama-2-7B-shaped int4 artifact (5.0 GiB loaded) the defaults' batch of 4 adds 1 GiB of
        float32 cache, the KV measurement at 512 and 2,048 tokens 0.5 and 2 GiB.  The report's KV
        figures are then the analytic ones, and say so.
        """
        return replace(self, batch_size=1, kv_context=0)


def informative_kv_context(graph: Graph, kv_context: int) -> int:
    """The largest report context up to ``kv_context`` at which measuring a session's KV tells something new.

    The smallest report context is always measured.  A larger one only where the IR says the
    cache is not proportional to the context there — a window or sinks cap it, static storage
    reserves its slots, pages round it — since on a cache that grows linearly the larger
    prefill (2,048 tokens: ~8 s per stage of SmolLM2) would measure the first figure times four.
    """
    from tokopt.optimizer.ir.cost import kv_bytes_for_context

    contexts = [c for c in DEFAULT_CONTEXTS if c <= kv_context]
    if not contexts:
        return kv_context
    per_token = kv_bytes_for_context(graph, contexts[0]) / contexts[0]
    informative = [c for c in contexts[1:] if abs(kv_bytes_for_context(graph, c) - per_token * c) > 0.5]
    return max([contexts[0], *informative])


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark for this process (Linux ≥ 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The resident-set high-water mark since the last reset (or since the process began)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def prefill_decode(session: Any, ids, decode_tokens: int,
                   around: contextlib.AbstractContextManager | None = None) -> tuple[float, float]:
    """Seconds for prefilling ``ids`` and for greedily decoding ``decode_tokens`` more (the decode steps run
    inside ``around``, e.g. a profiler)."""
    import torch

    with torch.inference_mode():
        cache = new_cache(session, ids.shape[0])
        t0 = time.perf_counter()
        logits = session.forward(ids, cache)
        t1 = time.perf_counter()
        with around or contextlib.nullcontext():
            t2 = time.perf_counter()
            for _ in range(decode_tokens):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                logits = session.forward(nxt, cache)
            t3 = time.perf_counter()
    return t1 - t0, t3 - t2


def measure_speed(session: Any, vocab_size: int, config: SpeedConfig = SpeedConfig()) -> dict[str, Any]:
    """tok/s for prefill and decode at batch 1 and at ``config.batch_size``, and peak RSS."""
    import torch

    gen = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(0, vocab_size, (config.batch_size, config.prompt_len), generator=gen)
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        out = _measure(session, ids, config)  # peak RSS is taken before the KV measurement's long prompt
        contexts = [c for c in DEFAULT_CONTEXTS if c <= config.kv_context]
        if contexts:
            out["kv_bytes_measured"] = measure_kv(session, vocab_size, contexts, config.seed)
        return out
    finally:
        torch.set_num_threads(previous_threads)


def _measure(session: Any, ids, config: SpeedConfig) -> dict[str, Any]:
    import torch

    reset_peak_rss()
    prefill_decode(session, ids[:1, : min(16, config.prompt_len)], 2)  # warm-up: allocations, lazy weights
    pre1, dec1 = prefill_decode(session, ids[:1], config.decode_tokens)
    out: dict[str, Any] = {
        "prefill_tok_s": config.prompt_len / pre1,
        "decode_tok_s": config.decode_tokens / dec1 if config.decode_tokens else 0.0,
    }
    if config.batch_size > 1:
        preb, decb = prefill_decode(session, ids, config.decode_tokens)
        out["prefill_tok_s_batch"] = config.batch_size * config.prompt_len / preb
        out["decode_tok_s_batch"] = config.batch_size * config.decode_tokens / decb if config.decode_tokens else 0.0
    if config.peer_decode_tokens:
        _, dec = prefill_decode(session, ids[:1, :PEER_PROMPT], config.peer_decode_tokens)
        out["decode_tok_s_peer"] = config.peer_decode_tokens / dec
    out["batch_size"] = config.batch_size
    out["threads"] = torch.get_num_threads()
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def measure_kv(session: Any, vocab_size: int, contexts: list[int], seed: int = 0) -> dict[str, int]:
    """The KV memory ``session`` holds allocated after prefilling each of ``contexts`` tokens (batch 1).

    Read from the session itself (``kv_nbytes``), so a cache that grows where the IR says it is
    bounded, or stores fp32 where the IR says int8, shows.  The prompt is prefilled in chunks, as
    a server would; a session whose cache is full stops the measurement there.  Empty when the
    session cannot say (a plugin backend without ``kv_nbytes``).
    """
    import torch

    from tokopt.errors import KVCacheFullError

    if not callable(getattr(session, "kv_nbytes", None)):
        return {}
    prompt = torch.randint(0, vocab_size, (1, max(contexts)), generator=torch.Generator().manual_seed(seed))
    cache, done, out = new_cache(session, 1), 0, {}
    with torch.inference_mode():
        for context in sorted(contexts):
            try:
                while done < context:
                    step = min(KV_CHUNK, context - done)
                    session.forward(prompt[:, done:done + step], cache)
                    done += step
            except KVCacheFullError as exc:
                log.info("KV memory measured up to %d tokens: %s", done, exc)
                break
            out[str(context)] = int(session.kv_nbytes(cache))
    return out


def artifact_vocab_size(manifest: dict[str, Any]) -> int:
    from tokopt.errors import ModelSourceError

    size = (manifest.get("model") or {}).get("vocab_size")
    if not size:
        raise ModelSourceError("the artifact's tokopt_artifact.json does not record the vocabulary size")
    return int(size)


def measure_artifact_speed(path: Path, config: SpeedConfig = SpeedConfig(), timeout: float | None = None,
                           ) -> dict[str, Any]:
    """Load the artifact at ``path`` in a fresh Python process and measure it there.

    A fresh process is what a deployment sees: its peak memory is the artifact's own,
    not the optimizer's (which holds several stages and the baseline distributions).
    """
    with ArtifactTimer() as timer:
        return timer.measure(path, config, timeout)


class ArtifactTimer:
    """The fresh process that measures one artifact, started before the artifact exists.

    Its Python and torch imports (~2.5 s) then overlap the caller's lowering instead of
    following it; it waits for one request on stdin (``python -m tokopt.measure.speed -``).
    On any way out — an interrupt included — the child is killed *and reaped*: ``subprocess.run``
    kills its child on ``KeyboardInterrupt`` (which SIGINT/SIGTERM raise, see
    :mod:`tokopt.interrupts`) but does not wait for it, so tokopt could exit while the child,
    holding a stage artifact, was still dying.  An interrupted run must end with nothing of it
    left, processes included.
    """

    child: subprocess.Popen | None = None

    def measure(self, path: Path, config: SpeedConfig = SpeedConfig(), timeout: float | None = None,
                ) -> dict[str, Any]:
        """The child's measurement of the artifact at ``path`` (TokoptError if it fails)."""
        assert self.child is not None, "use the timer as a context manager: with ArtifactTimer() as timer"
        request = json.dumps({"artifact": str(path), "config": config.as_dict()})
        stdout, stderr = self.child.communicate(request + "\n", timeout=timeout)
        if self.child.returncode != 0:
            from tokopt.errors import TokoptError

            tail = (stderr or stdout).strip().splitlines()[-5:]
            raise TokoptError(f"measuring the artifact at {path} failed (exit {self.child.returncode}): "
                              + " | ".join(tail))
        return json.loads(stdout.strip().splitlines()[-1])

    def __enter__(self) -> ArtifactTimer:
        """Start the child (in ``__enter__``: a ``with`` statement registers its exit in the same step, so no
        interrupt can land between the start and the cleanup being owed)."""
        cmd = [sys.executable, "-m", "tokopt.measure.speed", "-"]
        try:
            with deferred_interrupts():  # a signal during Popen would orphan the child it just started
                self.child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.child is None:
            return
        if self.child.returncode is None:
            self.child.kill()
            self.child.wait()
        for pipe in (self.child.stdin, self.child.stdout, self.child.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _main(argv: list[str]) -> int:
    """``python -m tokopt.measure.speed ARTIFACT [--config JSON]``: one JSON line on stdout.

    ARTIFACT ``-``: import first, then read one ``{"artifact": …, "config": …}`` line from stdin
    (:class:`ArtifactTimer`); an empty stdin (the caller went away) ends the process quietly.
    """
    import argparse

    from tokopt.backends.artifact import load_artifact, read_manifest

    parser = argparse.ArgumentParser(prog="python -m tokopt.measure.speed")
    parser.add_argument("artifact")
    parser.add_argument("--config", default="{}")
    args = parser.parse_args(argv)
    artifact, config_json = args.artifact, json.loads(args.config)
    if artifact == "-":  # this module's imports (torch among them) ran while the caller still lowers
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        request = json.loads(line)
        artifact, config_json = request["artifact"], request.get("config", {})
    config = SpeedConfig(**config_json)
    session = load_artifact(Path(artifact))
    result = measure_speed(session, artifact_vocab_size(read_manifest(artifact)), config)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
