"""CLI basics: version, clear one-line errors with exit code 2 for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

import tokopt
from tokopt.cli import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokopt.cli", *args], capture_output=True, text=True, timeout=300)


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and tokopt.__version__ in result.output


def test_unsupported_architecture_is_one_line_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = run_cli("inspect", str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "'bert' is not supported" in line and "llama" in line and "qwen2_moe" in line


def test_missing_model_exit_2():
    proc = run_cli("inspect", "/definitely/not/here")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not a model directory" in proc.stderr


def test_checkpoint_missing_tensor_is_a_clear_error(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = tiny_model_dir("llama")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "model.layers.1.mlp.up_proj.weight" in result.output


def test_inspect_tiny_model_human_and_json(tiny_model_dir):
    path, hf = tiny_model_dir("mixtral")
    human = CliRunner().invoke(cli, ["inspect", str(path), "--graph"])
    assert human.exit_code == 0 and "experts (active)" in human.output and "MoE(" in human.output
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json"]).stdout)
    assert info["params"] == sum(p.numel() for p in hf.parameters())
    assert info["num_experts"] == 4 and info["experts_per_token"] == 2
