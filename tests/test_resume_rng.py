"""RNG state is part of a resume: with dropout on (LoRA dropout, drawn from torch's global RNG), a
run stopped at step 3 and resumed reproduces the uninterrupted run's losses bit for bit. Without
the RNG restore the resumed steps draw the masks of steps 1-3 again and the losses differ."""
from __future__ import annotations

import pytest

from llmstack.train import train
from tests.helpers import tiny_config, train_losses

STEPS = 6
ARGS = {"lora.enabled": True, "lora.dropout": 0.3, "lora.targets": "[wq,wv,w1,w2]", "optim.lr": "1e-2",
        "train.max_steps": STEPS, "train.eval_every": STEPS, "checkpoint.every_steps": 3, "train.eval_batches": 1,
        "train.deterministic": True,
        # the first leg stops at step 3 inside the warmup, so its lr equals the full run's
        "schedule.warmup_steps": 3}


@pytest.mark.slow
def test_dropout_run_resumes_bit_identically(tmp_path):
    train(tiny_config(tmp_path / "full", **ARGS))
    train(tiny_config(tmp_path / "split", **{**ARGS, "train.max_steps": 3}))
    summary = train(tiny_config(tmp_path / "split", **ARGS))  # resumes from step 3
    assert summary["steps_this_run"] == STEPS - 3
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, STEPS + 1))
    assert [split[s] for s in range(4, STEPS + 1)] == [full[s] for s in range(4, STEPS + 1)], (full, split)
