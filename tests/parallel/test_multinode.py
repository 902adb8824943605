"""Multi-node launches run on one machine the way a cluster runs them: one launcher per "node",
meeting over 127.0.0.1, equal to the single-process run (loss and gradient norm at every step).

- torchrun: two node agents (scripts/launch_torchrun.sh with NNODES=2, NODE_RANK=0/1), c10d
  rendezvous, 2 ranks each: tensor parallel inside a node, data parallel across the nodes;
- the DeepSpeed launcher: two `deepspeed --no_ssh --node_rank` agents (scripts/launch_deepspeed.sh
  with HOSTFILE and NODE_RANK), one rank each, ZeRO-2 across the nodes. DeepSpeed's ssh/pdsh path
  (and its openmpi/mpich/impi/mvapich/slurm launchers) needs tools this machine lacks, and its
  hostfile refuses a repeated host name, so the two nodes are named localhost and 127.0.0.1;
- Slurm: srun and scontrol do not exist here, so they are replaced by stubs that record their
  arguments; the command the sbatch script generates is checked, and parsed by torchrun's own
  argument parser.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, train_losses
from tests.parallel import launch

pytestmark = pytest.mark.slow
TOL = 1e-5


def _nodes(cmds: list[list[str]], envs: list[dict], out: Path, timeout: float = 420) -> None:
    """Start one launcher per node, wait for all; on failure, every node's log in the message."""
    out.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for rank, (cmd, env) in enumerate(zip(cmds, envs)):
        log = open(out / f"node{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                      env={**launch.env(), **env}))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
        for log in logs:
            log.close()
    text = "\n".join(f"--- node {r}\n" + (out / f"node{r}.log").read_text()[-3000:] for r in range(len(procs)))
    assert codes == [0] * len(procs), text


def _matches_reference(out: Path, reference: dict) -> None:
    losses, norms = train_losses(out), launch.step_metric(out, "grad_norm")
    ref_norms = launch.step_metric(reference["out"], "grad_norm")
    assert len(losses) == launch.STEPS
    loss_diff, norm_diff = launch.rel_diff(losses, reference["losses"]), launch.rel_diff(norms, ref_norms)
    print(f"{out.name}: max relative difference loss {loss_diff:.2e}, grad norm {norm_diff:.2e}")
    assert loss_diff <= TOL and norm_diff <= TOL, (losses, reference["losses"], norms, ref_norms)


def test_torchrun_two_node_agents_match_one_process(reference, tmp_path):
    port = launch.free_port()
    args = launch.overrides(tmp_path, **{"parallel.tp": 2, "parallel.zero_stage": 1, "train.micro_batch_size": 4})
    cmd = ["bash", "scripts/launch_torchrun.sh", "2", *args]
    envs = [{"NNODES": "2", "NODE_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "PYTHON": sys.executable} for r in (0, 1)]
    _nodes([cmd, cmd], envs, tmp_path)
    log = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert "tp=2 pp=1 dp=2" in log and "on 4 x cpu" in log, log[-3000:]
    _matches_reference(tmp_path, reference)


def test_deepspeed_launcher_two_nodes_without_ssh_match_one_process(reference, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = launch.free_port()
    args = launch.overrides(tmp_path / "run", **{"parallel.zero_stage": 2, "train.micro_batch_size": 4})
    cmd = ["bash", "scripts/launch_deepspeed.sh", "1", *args]
    envs = [{"HOSTFILE": str(hostfile), "NODE_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "DEEPSPEED": str(Path(sys.executable).parent / "deepspeed")} for r in (0, 1)]
    _nodes([cmd, cmd], envs, tmp_path / "run")
    for r in (0, 1):  # each agent started its own node's rank, of a world of 2
        assert f"nnodes=2, num_local_procs=1, node_rank={r}" in (tmp_path / "run" / f"node{r}.log").read_text()
    _matches_reference(tmp_path / "run", reference)


def _stub(bin_dir: Path, name: str, body: str) -> None:
    f = bin_dir / name
    f.write_text("#!/usr/bin/env bash\n" + body)
    f.chmod(0o755)


def test_slurm_script_generates_one_torchrun_agent_per_node(tmp_path):
    from torch.distributed.run import get_args_parser
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.args"
    # A large allocation's host list: a reader that stops after the first line (head) makes the
    # writer die of SIGPIPE, which pipefail turns into a failed job.
    _stub(bin_dir, "scontrol", '[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] || exit 9\n'
                               'printf "gpu07\\ngpu08\\n"; for i in $(seq 1 20000); do printf "gpu%05d\\n" $i; done\n')
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {shlex.quote(str(record))}\n'
                           f'printf "MASTER_ADDR=%s MASTER_PORT=%s\\n" "$MASTER_ADDR" "$MASTER_PORT" >> {shlex.quote(str(record))}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_SUBMIT_DIR": str(ROOT),
           "PYTHON": sys.executable}
    train_args = ["--config", "configs/model/7b.yaml", "precision=bf16", "parallel.tp=8", "parallel.pp=2"]
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sbatch"), *train_args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    *argv, exported = record.read_text().splitlines()
    assert argv[:4] == ["--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run"]
    assert exported == "MASTER_ADDR=gpu07 MASTER_PORT=29500"
    torchrun = get_args_parser().parse_args(argv[4:])
    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.max_restarts) == ("2", "8", 1)
    assert (torchrun.rdzv_backend, torchrun.rdzv_endpoint, torchrun.rdzv_id) == ("c10d", "gpu07:29500", "4242")
    assert torchrun.module and torchrun.training_script == "llmstack"
    assert torchrun.training_script_args == ["train", *train_args]


@pytest.mark.parametrize("script", ["launch_torchrun.sh", "launch_deepspeed.sh", "slurm.sbatch"])
def test_launch_script_examples_name_configs_that_load(script):
    """Every `--config FILE overrides...` in a script's usage comments loads and validates on two
    nodes of 8 GPUs (the sbatch header's allocation)."""
    from llmstack.config import load_config
    from llmstack.parallel.plan import check_layout
    examples = re.findall(r"--config (\S+\.yaml)((?: [\w.]+=\S+)*)", (ROOT / "scripts" / script).read_text())
    assert examples, f"{script}: no --config example"
    for path, overrides in examples:
        cfg = load_config(ROOT / path, overrides.split())
        check_layout(cfg, 16)
