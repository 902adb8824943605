"""`llmstack export --format hf`: what it writes is loaded by transformers (AutoModelForCausalLM,
AutoTokenizer) and gives the llmstack model's logits and tokens."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from llmstack.checkpoint import save_model, write_manifest
from llmstack.cli import main
from llmstack.config import to_dict
from llmstack.model import Llama
from llmstack.pretrained import load_pretrained
from llmstack.train import train
from tests.helpers import tiny_config

TOL = 1e-4


def _export(src, out, capsys) -> dict:
    assert main(["export", "--format", "hf", "--checkpoint", str(src), "--out", str(out)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _logits_diff(hf_folder, model, vocab_size: int) -> float:
    from transformers import AutoModelForCausalLM
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_folder)).eval()
    tokens = torch.randint(0, vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf_model(input_ids=tokens).logits.float() - model(tokens)).abs().max().item()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(out, **{"train.max_steps": 2, "train.eval_every": 2, "checkpoint.every_steps": 2}))
    return out


def test_export_hf_loads_in_transformers_with_the_same_logits_and_tokens(trained_run, tmp_path, capsys):
    from transformers import AutoTokenizer
    out = tmp_path / "hf"
    assert _export(trained_run, out, capsys)["out"] == str(out)
    pre = load_pretrained(trained_run)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    diff = _logits_diff(out, pre.model, pre.cfg.model.vocab_size)
    assert diff <= TOL, diff
    text = "def area(r):\n    return 3.14159 * r ** 2  # ünïcode\n"
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.encode(text, add_special_tokens=False) == pre.tokenizer.encode(text)
    assert hf_tok.eos_token_id == pre.tokenizer.eot_id


def test_export_hf_tied_embeddings_multi_head(tmp_path, capsys):
    cfg = tiny_config(tmp_path, **{"model.tie_embeddings": True, "model.n_kv_heads": 4})
    torch.manual_seed(0)
    model = Llama(cfg.model).eval()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_model(model, folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_manifest(folder)  # as every llmstack save does
    _export(folder, tmp_path / "hf", capsys)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    diff = _logits_diff(tmp_path / "hf", model, cfg.model.vocab_size)
    assert diff <= TOL, diff


def test_export_hf_keeps_the_source_architecture(tmp_path, capsys):
    from tests.test_hf_parity import save_hf_model
    src = save_hf_model("mistral", tmp_path / "mistral")
    assert main(["convert", "--to", "llmstack", str(src), str(tmp_path / "ours")]) == 0
    _export(tmp_path / "ours", tmp_path / "hf", capsys)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mistral"
