"""A property-based corpus of broken inputs: every format tokopt reads, cut short and with bytes flipped.

For each input kind — a safetensors checkpoint, config.json, tokenizer.json, a GGUF file, an ONNX
model and its external data, a torch artifact's weights and graph, a recipe, an evaluation text —
hypothesis truncates the file at many offsets or flips bytes in its header, and the real command
runs on it.  Whatever the damage, the run ends in success (a flip that left a valid file: a digit
of a float, a letter of a token) or in exit 2 with one line on stderr that names the file; never a
traceback or another code, and a failed run leaves nothing: no OUT, no temporary sibling, no stage
directory in ``$TMPDIR``, no half-converted GGUF in the cache.

``CASES_PER_KIND`` examples per kind (derandomized, so CI sees the same corpus every time).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import save_tiny_gguf, save_tiny_llama

from tokopt.cli import cli

CASES_PER_KIND = 48
SMALL = ["--eval-tokens", "1x16", "--calib-tokens", "1x16", "--speed", "off"]


@dataclass(frozen=True)
class InputKind:
    """One file of one input format, and the command that reads it (``{model}``/``{file}``/``{out}`` filled in)."""

    name: str
    model: str  # which prepared model the case copies: hf, gguf, onnx, torch
    file: str  # the file to damage, relative to the model's copy
    command: tuple[str, ...]
    header: int | None = None  # bytes counted as the header for flips (None: the whole file)


OPTIMIZE = ("optimize", "{model}", "--passes", "", "--backend", "none", *SMALL, "-o", "{out}")
KINDS = [
    InputKind("safetensors", "hf", "model.safetensors", OPTIMIZE, header=2200),
    InputKind("config.json", "hf", "config.json", OPTIMIZE),
    InputKind("tokenizer.json", "hf", "tokenizer.json", OPTIMIZE),
    InputKind("gguf", "gguf", "tiny.gguf", ("optimize", "{file}", "--passes", "", "--backend", "none", *SMALL,
                                            "--eval-text", "{words}/eval.txt", "--calib-text", "{words}/calib.txt",
                                            "-o", "{out}"), header=2752),
    InputKind("onnx", "onnx", "model.onnx", OPTIMIZE),
    InputKind("onnx-external-data", "onnx", "model.onnx.data", OPTIMIZE, header=4096),
    InputKind("torch-artifact-weights", "torch", "weights.safetensors",
              ("eval", "{model}", "--eval-tokens", "1x16", "--json"), header=2200),
    InputKind("torch-artifact-graph", "torch", "graph.json", ("eval", "{model}", "--eval-tokens", "1x16", "--json")),
    InputKind("recipe", "recipe", "recipe.yaml", ("optimize", "{hf}", "--recipe", "{file}", "--backend", "none",
                                                  *SMALL, "-o", "{out}")),
    InputKind("eval-text", "text", "eval.txt", ("optimize", "{hf}", "--passes", "", "--backend", "none",
                                                "--eval-text", "{file}", *SMALL, "-o", "{out}")),
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Intact inputs of every kind, made once: a tiny llama (HF), its torch and onnxruntime artifacts, a GGUF."""
    root = tmp_path_factory.mktemp("corpus-sources")
    hf = save_tiny_llama(root / "hf", layers=2)
    (root / "gguf").mkdir()
    save_tiny_gguf(root / "gguf" / "tiny.gguf")
    (root / "words").mkdir()  # texts the tiny GGUF's vocabulary (w3 … wN) can spell
    (root / "words" / "eval.txt").write_text(" ".join(f"w{3 + i % 50}" for i in range(200)))
    (root / "words" / "calib.txt").write_text(" ".join(f"w{3 + i * 7 % 50}" for i in range(200)))
    for backend in ("torch", "onnxruntime"):
        result = CliRunner().invoke(cli, ["optimize", str(hf), "--passes", "", "--backend", backend, *SMALL,
                                          "-o", str(root / backend)])
        assert result.exit_code == 0, result.output
    (root / "recipe").mkdir()
    (root / "recipe" / "recipe.yaml").write_text(
        "version: 1\npasses:\n  - quantize: {bits: 8, group_size: 32}\ngates: {max_ppl_increase: 1000}\n"
        "eval: {sequences: 1, seq_len: 16, calib_sequences: 1, calib_seq_len: 16}\n")
    (root / "text").mkdir()
    (root / "text" / "eval.txt").write_text(" ".join(f"w{3 + i % 120} é" for i in range(200)), encoding="utf-8")
    return {"hf": hf, "gguf": root / "gguf", "onnx": root / "onnxruntime", "torch": root / "torch",
            "recipe": root / "recipe", "text": root / "text", "words": root / "words"}


def truncations(data: bytes) -> st.SearchStrategy[tuple[int, ...]]:
    """A cut: ``(offset,)`` — the file keeps its first ``offset`` bytes."""
    return st.tuples(st.integers(0, len(data) - 1))


def flips(data: bytes, header: int) -> st.SearchStrategy[tuple[int, ...]]:
    """One to four ``(position, xor mask)`` pairs inside the first ``header`` bytes, flattened."""
    span = min(header, len(data))
    pairs = st.lists(st.tuples(st.integers(0, span - 1), st.integers(1, 255)), min_size=1, max_size=4)
    return pairs.map(lambda ps: tuple(v for pair in ps for v in pair))


def damaged(data: bytes, damage: tuple[int, ...]) -> tuple[str, bytes]:
    """Apply a cut or flips (see the two strategies above); returns a description and the bytes."""
    if len(damage) == 1:
        return f"cut at byte {damage[0]}", data[: damage[0]]
    b = bytearray(data)
    pairs = list(zip(damage[::2], damage[1::2], strict=True))
    for pos, mask in pairs:
        b[pos] ^= mask
    return "flipped " + ", ".join(f"byte {p} ^ {m:#04x}" for p, m in pairs), bytes(b)


def leftovers(directory: Path, before: set[str]) -> list[str]:
    return sorted(set(p.name for p in directory.iterdir()) - before)


class Outcomes:
    """What the corpus produced per kind: exit code -> count, and the first message of each code."""

    def __init__(self) -> None:
        self.table: dict[str, dict[int, list[str]]] = {}

    def add(self, kind: str, code: int, message: str) -> None:
        self.table.setdefault(kind, {}).setdefault(code, []).append(message)


OUTCOMES = Outcomes()


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_damaged_input_ends_in_one_line_and_leaves_nothing(kind: InputKind, sources, tmp_path_factory, monkeypatch):
    work = tmp_path_factory.mktemp(f"corpus-{kind.name}")
    scratch = work / "tmp"  # this test's $TMPDIR: stage directories would show here
    scratch.mkdir()
    cache = work / "cache"
    monkeypatch.setenv("TOKOPT_CACHE_DIR", str(cache))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    intact = (sources[kind.model] / kind.file).read_bytes()
    damage = st.one_of(truncations(intact), flips(intact, kind.header or len(intact)))
    counter = iter(range(10**6))

    @settings(max_examples=CASES_PER_KIND, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(damage)
    def case(damage: tuple[int, ...]) -> None:
        how, data = damaged(intact, damage)
        copy = work / f"case{next(counter)}"
        shutil.copytree(sources[kind.model], copy)
        (copy / kind.file).write_bytes(data)
        out = work / "outs" / copy.name / "OUT"
        fill: dict[str, str] = {"model": str(copy), "file": str(copy / kind.file), "out": str(out),
                                "hf": str(sources["hf"]), "words": str(sources["words"])}
        args = [a.format(**fill) for a in kind.command]
        result = CliRunner().invoke(cli, args)
        where = f"{kind.name} {how}: exit {result.exit_code}\n{result.output}"
        assert isinstance(result.exception, SystemExit) or result.exception is None, \
            f"{where}\ntraceback: {result.exc_info and result.exc_info[1]!r}"
        assert result.exit_code in (0, 2), where
        OUTCOMES.add(kind.name, result.exit_code, result.stderr.strip())
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), where
            assert copy.name in lines[0] or kind.file in lines[0], f"the message does not name the file: {where}"
            assert not out.parent.exists() or not any(out.parent.iterdir()), where
        assert not list(scratch.iterdir()), f"left in $TMPDIR: {list(scratch.iterdir())}; {where}"
        if cache.exists():
            assert not [p for p in cache.rglob(".tmp-*")], where
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(out.parent, ignore_errors=True)

    case()


def test_corpus_summary(capsys):
    """Prints the corpus's outcome table (``pytest -s``): kind, exit code, cases, a sample message."""
    if not OUTCOMES.table:
        pytest.skip("run with the corpus tests")
    with capsys.disabled():
        for kind, codes in OUTCOMES.table.items():
            for code, messages in sorted(codes.items()):
                print(f"\n{kind:24} exit {code}: {len(messages):3} cases  e.g. {messages[0][:160]}")


Runner = Callable[..., object]
