"""Hub ids resolve through the local Hugging Face cache, honouring offline mode."""

from __future__ import annotations

import shutil

import pytest
import torch

import tokopt
from tokopt.errors import ModelSourceError
from tokopt.optimizer.interpret import ReferenceExecutor


def _fake_hub_cache(root, repo_id: str, model_dir) -> None:
    """Lay out ``model_dir`` the way huggingface_hub caches a snapshot of ``repo_id``."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_offline_hub_id_loads_from_cache(tiny_model_dir, tmp_path, monkeypatch):
    path, hf = tiny_model_dir("qwen2")
    _fake_hub_cache(tmp_path, "tiny-org/tiny-qwen2", path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    graph = tokopt.load("tiny-org/tiny-qwen2")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = hf(ids).logits
    assert (ReferenceExecutor(graph).forward(ids) - expected).abs().max() <= 1e-4


def test_offline_hub_id_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="cannot fetch 'nobody/nothing'"):
        tokopt.load("nobody/nothing")
