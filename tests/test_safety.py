"""Safe loading: no pickle anywhere, no implicit remote code, secrets never written to a run."""
import re
from pathlib import Path

from llmstack.train import train
from tests.helpers import ROOT, tiny_config


def _package_sources():
    return sorted((ROOT / "llmstack").rglob("*.py"))


def test_no_pickle_loading_and_no_implicit_remote_code():
    for path in _package_sources():
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"pickle\.loads?\(", text), path
        assert "trust_remote_code=True" not in text, path


def test_wandb_key_is_never_written(tmp_path, monkeypatch):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(tiny_config(tmp_path, **{"train.max_steps": 3, "logging.wandb": True}))
    for f in Path(tmp_path).rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
