"""ONNX export: onnxruntime logits equal torch logits (dynamic batch and sequence), and the CLI
(--format hf is checked through transformers in tests/test_export_hf.py)."""
import json

import pytest
import torch
import yaml

from llmstack.config import to_dict
from llmstack.export import check_onnx, export_onnx
from llmstack.model import Llama
from tests.helpers import run_cli, tiny_config

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("extra", [{}, {"model.tie_embeddings": True, "model.n_kv_heads": 4}])
def test_onnx_matches_torch_logits(tmp_path, extra):
    cfg = tiny_config(tmp_path, **extra)
    torch.manual_seed(0)
    model = Llama(cfg.model).eval()
    info = export_onnx(model, tmp_path / "m.onnx", vocab_size=cfg.model.vocab_size)
    assert info["max_abs_diff"] < 1e-4
    for shape in [(1, 1), (1, 50), (4, 7)]:  # dynamic axes: other batch and sequence sizes than traced
        assert check_onnx(tmp_path / "m.onnx", model, torch.randint(0, 512, shape)) < 1e-4


def _checkpoint(tmp_path):
    from llmstack.checkpoint import save_model
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_model(Llama(cfg.model), folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return folder


@pytest.mark.slow
def test_cli_export_onnx(tmp_path):
    folder = _checkpoint(tmp_path)
    r = run_cli("export", "--format", "onnx", "--checkpoint", str(folder), "--out", str(tmp_path / "out.onnx"))
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["max_abs_diff"] < 1e-4 and (tmp_path / "out.onnx").exists()
    r = run_cli("export", "--format", "onnx", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
