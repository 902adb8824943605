"""Crash safety through real processes: SIGKILL at random steps, and death in the middle of a save."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_cli, tiny_overrides, train_losses

STEPS = 40
ARGS = {"train.max_steps": STEPS, "train.eval_every": 20, "checkpoint.every_steps": 3, "checkpoint.keep_last": 2,
        "train.deterministic": True}


def _launch(out_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmstack", "train", *tiny_overrides(out_dir, **ARGS)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _last_logged_step(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return max(steps, default=0)


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    done = run_cli("train", *tiny_overrides(ref, **ARGS))
    assert done.returncode == 0, done.stderr[-2000:]
    expected = train_losses(ref)

    run = tmp_path / "killed"
    rng = random.Random(1234)
    kill_points = sorted(rng.sample(range(2, STEPS - 2), 3))
    killed_at = []
    for target in kill_points:
        proc = _launch(run)
        deadline = time.time() + 120
        while _last_logged_step(run) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(_last_logged_step(run))
    final = run_cli("train", *tiny_overrides(run, **ARGS))
    assert final.returncode == 0, final.stderr[-2000:]
    got = train_losses(run)  # later lines overwrite steps that were replayed after a resume
    assert sorted(got) == sorted(expected)
    assert got == expected, f"killed at {killed_at}"
    print(f"kill points (steps logged when killed): {killed_at}")


CRASH_SCRIPT = r"""
import os, signal, sys
import llmstack.checkpoint as ckpt
from llmstack.cli import main
real = ckpt.save_model
calls = {"n": 0}
def dying_save(model, folder, filename="model.safetensors"):
    calls["n"] += 1
    if calls["n"] == 2:  # second checkpoint: write half a file, then die like a power cut
        real(model, folder, filename)
        path = folder / filename
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(model, folder, filename)
ckpt.save_model = dying_save
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_death_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    args = tiny_overrides(tmp_path, **{"train.max_steps": 12, "checkpoint.every_steps": 4, "train.eval_every": 100})
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckdir = tmp_path / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "step_4"
    assert (ckdir / "step_8.tmp").exists() and not (ckdir / "step_8").exists()
    ev = run_cli("eval", "--checkpoint", str(tmp_path), "--batches", "1")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.strip().splitlines()[-1])["checkpoint"].endswith("step_4")
    # resuming continues from step 4 and cleans the half-written folder
    res = run_cli("train", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (ckdir / "latest").read_text().strip() == "step_12"
    assert not (ckdir / "step_8.tmp").exists()
