"""Multi-process runs for the parallel tests: `python -m torch.distributed.run` (torchrun) on CPU/gloo."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, tiny_overrides

ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
STEPS = 5


def overrides(out_dir: Path, **extra) -> list[str]:
    base = {"train.max_steps": STEPS, "train.eval_every": STEPS, "checkpoint.every_steps": STEPS,
            "train.resume": "never", "train.micro_batch_size": 8}
    base.update(extra)
    return tiny_overrides(out_dir, **base)


def command(nproc: int, args: list[str], max_restarts: int = 0) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "llmstack", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "llmstack", "train", *args]


def env() -> dict:
    return {**os.environ, **ENV}


def train(nproc: int, out_dir: Path, timeout: float = 300, max_restarts: int = 0, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(nproc, overrides(out_dir, **extra), max_restarts), capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=ROOT)
    (Path(out_dir) / "launcher.log").parent.mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "launcher.log").write_text(proc.stdout + proc.stderr)
    return proc


def start(nproc: int, out_dir: Path, max_restarts: int = 0, **extra) -> subprocess.Popen:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(out_dir) / "launcher.log", "w")
    return subprocess.Popen(command(nproc, overrides(out_dir, **extra), max_restarts), stdout=log, stderr=subprocess.STDOUT,
                            env=env(), cwd=ROOT, start_new_session=True)


def tail(out_dir: Path, n: int = 3000) -> str:
    f = Path(out_dir) / "launcher.log"
    return f.read_text()[-n:] if f.exists() else ""


def rel_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), f"steps differ: {sorted(a)} vs {sorted(b)}"
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in b)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_metric(out_dir: Path, key: str) -> dict[int, float]:
    from tests.helpers import read_metrics
    return {r["step"]: r[key] for r in read_metrics(out_dir) if key in r}


def _gloo_entry(rank: int, nproc: int, port: int, fn, args, queue) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    try:
        queue.put((rank, fn(rank, *args)))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, nproc: int, *args, timeout: float = 180) -> list:
    """fn(rank, *args) in `nproc` spawned processes of one gloo group; the results in rank order.
    fn must be a module-level function; return numpy arrays, not tensors (shared-memory tensors
    die with the process that made them)."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gloo_entry, args=(r, nproc, port, fn, args, queue)) for r in range(nproc)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [results[r] for r in range(nproc)]
