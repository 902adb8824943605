"""Shared test settings: a small stdlib corpus and a very small model, so tests run in seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# One small corpus for the whole suite, built once (tests share it, read-only).
TEST_DATA_DIR = Path(os.environ.get("LLMSTACK_TEST_DATA", ROOT / ".cache" / "test_data"))


def tiny_overrides(out_dir: Path | str, **extra) -> list[str]:
    """Dotted overrides for a ~100k-param model on a 120-file corpus with a 512-token BPE."""
    base = {
        "out_dir": str(out_dir),
        "data.dir": str(TEST_DATA_DIR),
        "data.max_files": 120,
        "data.seq_len": 64,
        "model.vocab_size": 512,
        "model.dim": 64,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.max_seq_len": 128,
        "train.micro_batch_size": 4,
        "train.max_steps": 20,
        "train.eval_every": 10,
        "train.eval_batches": 2,
        "train.log_every": 1,
        "train.sample_tokens": 0,
        "train.progress": False,
        "logging.wandb": False,
        "schedule.warmup_steps": 5,
        "checkpoint.every_steps": 10,
    }
    base.update(extra)
    if "schedule.warmup_steps" not in extra:  # short test runs: warmup may not outlast the run
        base["schedule.warmup_steps"] = min(5, int(base["train.max_steps"]))
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(out_dir: Path | str, **extra):
    from llmstack.config import CONFIGS_DIR, load_config
    return load_config(CONFIGS_DIR / "tiny.yaml", tiny_overrides(out_dir, **extra))


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m llmstack ...` in a subprocess, as a user would."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmstack", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


def read_metrics(run_dir: Path | str) -> list[dict]:
    import json
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x]


def train_losses(run_dir: Path | str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def grad_norms(run_dir: Path | str) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r}
