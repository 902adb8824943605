"""Reliability, distributed parts: exact resume after a SIGKILL, torchrun restarts, a dead rank."""
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from llmstack import checkpoint as ckpt
from tests.helpers import read_metrics, train_losses
from tests.parallel import launch
from tests.parallel.conftest import LAYOUTS

pytestmark = pytest.mark.slow


def _latest_step(out: Path) -> int:
    f = Path(out) / "checkpoints" / "latest"
    try:
        return int(f.read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


def _wait(cond, proc, timeout=120.0):
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() - t0 < timeout, "timed out waiting for the run"
        time.sleep(0.02)


def _workers(proc) -> list[int]:
    """pids of torchrun's worker processes (children of the launcher)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(x) for x in out)


def _kill_job(proc) -> None:
    """SIGKILL the launcher and every rank. torchrun's workers run in sessions of their own, so killing
    the launcher's group alone leaves them training (and checkpointing) on."""
    workers = _workers(proc)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.monotonic() - t0 < 30, "a rank outlived SIGKILL"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_zero2_resume_after_sigkill_of_the_job_is_bit_identical(layout_run, tmp_path):
    uninterrupted = layout_run("zero2_dp2")["losses"]
    nproc, extra = LAYOUTS["zero2_dp2"]
    extra = {**extra, "train.resume": "auto", "checkpoint.every_steps": 1}
    for attempt in range(3):  # a starved poller can let the job finish before the kill; kill again sooner
        run = tmp_path / f"attempt{attempt}"
        proc = launch.start(nproc, run, **extra)
        _wait(lambda: (run / "checkpoints" / "step_1").is_dir(), proc)
        _kill_job(proc)
        resume_from = ckpt.latest_checkpoint(run)  # what the trainer will pick, pointer or not
        if resume_from is not None and int(resume_from.name.split("_")[1]) < launch.STEPS:
            break
    else:
        pytest.fail("the run finished before the kill three times; nothing was resumed")
    tmp_path = run
    again = launch.train(nproc, tmp_path, **extra)
    assert again.returncode == 0, launch.tail(tmp_path)
    assert f"resumed from" in again.stdout + again.stderr
    assert train_losses(tmp_path) == uninterrupted  # bit for bit


def test_torchrun_max_restarts_resumes_tp2_from_latest(layout_run, tmp_path):
    uninterrupted = layout_run("tp2")["losses"]
    nproc, extra = LAYOUTS["tp2"]
    extra = {**extra, "train.resume": "auto", "checkpoint.every_steps": 1}
    proc = launch.start(nproc, tmp_path, max_restarts=1, **extra)
    _wait(lambda: _latest_step(tmp_path) >= 1 and len(_workers(proc)) == nproc, proc)
    os.kill(_workers(proc)[-1], signal.SIGKILL)  # one rank dies; torchrun restarts the group
    assert proc.wait(timeout=240) == 0, launch.tail(tmp_path)
    log = launch.tail(tmp_path, 100000)
    assert "resumed from" in log, log[-3000:]
    assert train_losses(tmp_path) == uninterrupted  # bit for bit


def test_dead_rank_makes_the_others_exit_in_bounded_time(tmp_path):
    timeout_s = 20
    proc = launch.start(2, tmp_path, **{"parallel.zero_stage": 1, "train.micro_batch_size": 4, "train.max_steps": 100000,
                                         "train.eval_every": 100000, "checkpoint.every_steps": 100000,
                                         "parallel.timeout_s": timeout_s})
    metrics = Path(tmp_path) / "metrics.jsonl"
    _wait(lambda: metrics.exists() and len(read_metrics(tmp_path)) >= 2 and len(_workers(proc)) == 2, proc)
    victim = _workers(proc)[-1]
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    rc = proc.wait(timeout=timeout_s + 60)
    elapsed = time.monotonic() - t0
    log = launch.tail(tmp_path, 100000)
    (Path(os.environ.get("LLMSTACK_DEAD_RANK_REPORT", tmp_path / "dead_rank.txt"))).write_text(f"{elapsed:.2f}\n")
    print(f"dead rank: job exited {elapsed:.2f}s after SIGKILL of one rank (rc {rc})")
    assert rc != 0
    assert elapsed < timeout_s + 10, f"the surviving rank took {elapsed:.1f}s to exit"
    assert "lost contact with a peer rank" in log, log[-3000:]  # our one line, not only a backend traceback


def test_hung_rank_is_detected_after_parallel_timeout_s(tmp_path):
    """A rank that stops answering (SIGSTOP) but does not die: the others give up after timeout_s."""
    timeout_s = 5
    proc = launch.start(2, tmp_path, **{"parallel.zero_stage": 1, "train.micro_batch_size": 4, "train.max_steps": 100000,
                                         "train.eval_every": 100000, "checkpoint.every_steps": 100000,
                                         "parallel.timeout_s": timeout_s})
    metrics = Path(tmp_path) / "metrics.jsonl"
    workers = []
    try:
        _wait(lambda: metrics.exists() and len(read_metrics(tmp_path)) >= 2 and len(_workers(proc)) == 2, proc)
        workers = _workers(proc)
        t0 = time.monotonic()
        os.kill(workers[-1], signal.SIGSTOP)
        _wait(lambda: "lost contact with a peer rank" in launch.tail(tmp_path, 100000), proc, timeout=timeout_s + 60)
        elapsed = time.monotonic() - t0
        print(f"hung rank: detected {elapsed:.2f}s after SIGSTOP (parallel.timeout_s={timeout_s})")
        assert timeout_s - 1 <= elapsed < timeout_s + 30
    finally:
        # torchrun starts workers in their own sessions: the stopped rank must be killed by pid
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
