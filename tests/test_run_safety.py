"""What llmstack never does to a run folder: restart over existing checkpoints, overwrite a finished
run, let two trainings share a folder, save non-finite weights, ignore a changed setting silently,
or lose the previous checkpoint when a save fails."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmstack import checkpoint as ckpt
from tests.helpers import ROOT, read_metrics, run_cli, tiny_overrides, train_losses
from tests.test_bad_inputs import snapshot

pytestmark = pytest.mark.slow
SHORT = {"train.max_steps": 8, "checkpoint.every_steps": 4, "train.eval_every": 4, "checkpoint.keep_last": 3,
         "train.deterministic": True}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    res = run_cli("train", *tiny_overrides(out, **SHORT))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_training_a_finished_run_again_changes_nothing(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    before = snapshot(run)
    res = run_cli("train", *tiny_overrides(run, **SHORT))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already at step 8" in res.stderr
    assert snapshot(run) == before
    summary = json.loads((run / "summary.json").read_text())  # strict JSON, still the real summary
    assert summary["steps"] == 8 and math.isfinite(summary["final_train_loss"]) and summary["final_val_loss"]


KILL_AFTER_SAVE = r"""
import os, signal, sys
import llmstack.checkpoint as ckpt
from llmstack.cli import main
real = ckpt.atomic_save
def save_then_die(out_dir, step, *a, **k):
    path = real(out_dir, step, *a, **k)
    if step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path
ckpt.atomic_save = save_then_die
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _run_script(script: str, args: list[str], env: dict | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline", **(env or {})}, timeout=timeout)


def test_resumed_run_summary_equals_the_uninterrupted_one(finished, tmp_path):
    run = tmp_path / "run"
    killed = _run_script(KILL_AFTER_SAVE, tiny_overrides(run, **SHORT), env={"KILL_AT_STEP": "4"})
    assert killed.returncode == -signal.SIGKILL
    res = run_cli("train", *tiny_overrides(run, **SHORT))
    assert res.returncode == 0, res.stderr[-2000:]
    want, got = (json.loads((r / "summary.json").read_text()) for r in (finished, run))
    for key in ("final_train_loss", "final_val_loss", "val_ppl", "steps", "params", "skipped_steps"):
        assert got[key] == want[key], key
    assert train_losses(run) == train_losses(finished)


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00garbage", b"../../elsewhere/step_4\n", b"step_99\n"])
def test_bad_latest_pointer_resumes_from_the_newest_good_checkpoint(finished, tmp_path, pointer):
    run = _copy(finished, tmp_path / "run")
    (run / "checkpoints" / "latest").write_bytes(pointer)
    res = run_cli("train", *tiny_overrides(run, **{**SHORT, "train.max_steps": 10}))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "using step_8, the newest checkpoint that verifies" in res.stderr
    assert "resumed from" in res.stderr and (run / "checkpoints" / "latest").read_text().strip() == "step_10"
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps.count(1) == 1, "the run started over"


def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    f = run / "checkpoints" / "step_8" / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:-5] + b"xxxxx")
    res = run_cli("train", *tiny_overrides(run, **{**SHORT, "train.max_steps": 10}))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "using step_4" in res.stderr and "resumed from" in res.stderr and "at step 4" in res.stderr


def test_a_second_training_on_the_same_folder_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "llmstack", "train", *tiny_overrides(run, **{
        "train.max_steps": 100000, "checkpoint.every_steps": 5})], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "offline"})
    try:
        deadline = time.time() + 180
        while not (run / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.1)
        config_before = (run / "config.yaml").read_bytes()
        second = run_cli("train", *tiny_overrides(run, **{"train.max_steps": 100000}))
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by pid {first.pid}" in second.stderr
        assert (run / "config.yaml").read_bytes() == config_before
        assert first.poll() is None, "the first run died"
    finally:
        first.kill()
        first.wait()
    step = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    third = run_cli("train", *tiny_overrides(run, **{"train.max_steps": step}))  # the dead holder left no lock
    assert third.returncode == 0 and "already at step" in third.stderr, third.stderr[-2000:]


def test_weights_that_become_infinite_are_never_saved(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    res = run_cli("train", *tiny_overrides(run, **{**SHORT, "train.max_steps": 12, "checkpoint.every_steps": 1,
                                                   "optim.lr": 1e300, "schedule.warmup_steps": 0}))
    assert res.returncode == 3, res.stderr[-2000:]
    assert "not saved" in res.stderr and "Last good checkpoint" in res.stderr
    for folder in ckpt.saved_steps(run):
        ckpt.verify(folder)
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values()), folder
    assert ckpt.latest_checkpoint(run).name == "step_8"


def test_changed_optimizer_setting_on_resume_is_applied_and_said(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    res = run_cli("train", *tiny_overrides(run, **{**SHORT, "train.max_steps": 9, "optim.weight_decay": 0.0}))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "optim.weight_decay: the checkpoint step_8 has 0.1, this run's config 0.0; using 0.0" in res.stderr
    groups = json.loads((run / "checkpoints" / "step_9" / "optimizer.json").read_text())["param_groups"]
    assert groups[0]["weight_decay"] == 0.0


def test_checkpoints_of_a_run_resumed_from_a_path_load_after_the_path_is_gone(finished, tmp_path):
    source = _copy(finished / "checkpoints" / "step_4", tmp_path / "source")
    run = tmp_path / "run"
    res = run_cli("train", *tiny_overrides(run, **{**SHORT, "train.resume": str(source)}))
    assert res.returncode == 0, res.stderr[-2000:]
    shutil.rmtree(source)
    ev = run_cli("eval", "--checkpoint", str(run), "--batches", "1", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]


DISK_FULL = r"""
import resource, signal, sys
from llmstack.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    before = snapshot(run / "checkpoints" / "step_8")
    res = _run_script(DISK_FULL, tiny_overrides(run, **{**SHORT, "train.max_steps": 12}))
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("llmstack: error:")]
    assert len(errors) == 1 and "file too large while saving step 12" in errors[0], res.stderr[-2000:]
    assert "the previous checkpoint step_8 is intact" in errors[0]
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert ckpt.latest_checkpoint(run).name == "step_8" and snapshot(run / "checkpoints" / "step_8") == before


# Each point is an (os function, call number) at which the process is SIGKILLed: inside the folder
# rename, the pointer update and the pruning of old checkpoints, repeatedly, in one run.
KILL_AT_CALL = r"""
import os, shutil, signal, sys
import llmstack.checkpoint as ckpt
from llmstack.cli import main
name, nth = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}
def wrap(real):
    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return dying
target = {"rename": (ckpt.os, "rename"), "replace": (ckpt.os, "replace"), "rmtree": (ckpt.shutil, "rmtree"),
          "fsync": (ckpt.os, "fsync")}[name]
setattr(target[0], target[1], wrap(getattr(*target)))
sys.exit(main(["train", *sys.argv[3:]]))
"""


def test_sigkill_inside_saves_never_loses_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(run, **{"train.max_steps": 14, "checkpoint.every_steps": 2, "checkpoint.keep_last": 1,
                                  "train.eval_every": 100})
    newest_good = None
    for name, nth in [("rename", 1), ("replace", 1), ("rmtree", 1), ("fsync", 7), ("rename", 2), ("replace", 2)]:
        res = _run_script(KILL_AT_CALL, [name, str(nth), *args])
        assert res.returncode in (-signal.SIGKILL, 0), res.stderr[-2000:]
        latest = ckpt.latest_checkpoint(run)  # verifies; never raises while a good one exists
        if newest_good is not None:
            assert latest is not None and int(latest.name[5:]) >= newest_good, (name, nth, latest)
        newest_good = int(latest.name[5:]) if latest else newest_good
    final = run_cli("train", *args)
    assert final.returncode == 0, final.stderr[-2000:]
    assert ckpt.latest_checkpoint(run).name == "step_14"
