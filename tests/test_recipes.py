"""Each recipe runs end to end on the example data: loss falls, checkpoints/metrics/summary are
written, the HF export loads in transformers with the same logits, and `llmstack eval --text-file`
scores it. The SFT run also writes an offline W&B run folder."""
from __future__ import annotations

import json
import math

import pytest
import torch

from llmstack import checkpoint as ckpt
from llmstack.config import CONFIGS_DIR, load_config
from tests.helpers import train_losses
from tests.test_hf_data import example_dir

RECIPES = CONFIGS_DIR / "recipes"


def recipe_config(name: str, tmp_path, wandb: bool = False):
    ex = example_dir()
    data = ex / ("corpus.jsonl" if name == "continued_pretraining" else "chat.jsonl")
    over = {"init_from": f"hf:{ex / 'tiny-llama'}", "data.paths": json.dumps([str(data)]),
            "data.tokenizer_path": str(ex / "tiny-llama"), "data.dir": str(tmp_path / "cache"),
            "out_dir": str(tmp_path / "run"), "data.seq_len": 64, "train.micro_batch_size": 4,
            "train.max_steps": 24, "train.eval_every": 12, "train.log_every": 1, "train.eval_batches": 2,
            "checkpoint.every_steps": 12, "train.sample_tokens": 8, "train.progress": False,
            "logging.wandb": str(wandb).lower(), "data.num_proc": 1}
    return load_config(RECIPES / f"{name}.yaml", [f"{k}={v}" for k, v in over.items()])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["continued_pretraining", "sft", "lora"])
def test_recipe_end_to_end(name, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmstack.cli import main
    from llmstack.train import train
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = recipe_config(name, tmp_path, wandb=(name == "sft"))
    summary = train(cfg)
    run = cfg.run_dir
    losses = train_losses(run)
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < first - 0.5, (first, last)
    assert summary["final_val_loss"] < math.log(384) - 0.3  # below a uniform guess over the vocabulary
    for f in ("summary.json", "metrics.jsonl", "config.yaml", "loss.png"):
        assert (run / f).exists(), f
    latest = ckpt.latest_checkpoint(run)
    assert latest is not None and latest.name == "step_24"
    if name == "sft":
        offline = list((run / "wandb").glob("offline-run-*"))
        assert offline and list(offline[0].glob("run-*.wandb")), "no offline W&B run folder"

    capsys.readouterr()
    assert main(["convert", "--to", "hf", str(run), str(tmp_path / "hf")]) == 0
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = torch.tensor([tok.encode("Alice has 3 apples. Bob gives Alice 2 more apples.")])
    if name == "lora":
        from llmstack.pretrained import load_lora_checkpoint
        ours = load_lora_checkpoint(run).model
    else:
        from llmstack.pretrained import load_pretrained
        ours = load_pretrained(run).model
    with torch.no_grad():
        assert (hf_model(input_ids=ids).logits - ours(ids)).abs().max().item() <= 1e-4

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "hf"), "--text-file", str(example_dir() / "eval.txt")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kind"] == "hf" and result["tokens"] > 100 and result["loss"] < math.log(384)
