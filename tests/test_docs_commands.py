"""Every command the documentation shows (tests/doc_commands.py finds them) is run, in a scratch
folder laid out like the repository, so a renamed flag, a missing config or a broken example fails
here before a reader finds it.

How a command is run, by rule:
- `llmstack train|distill|data` (also through `.venv/bin/llmstack`, `python -m` or torchrun) get
  overrides appended that shrink the run: the test corpus and model for the stdlib corpus, two
  steps for every run. A model over MAX_PARAMS, or a launcher for GPUs (scripts/launch_*.sh,
  sbatch, the deepspeed launcher), is dry-run instead: `llmstack plan` with the same config,
  overrides and world size validates the config and the layout. A training command whose run
  folder an earlier example already wrote gets a folder of its own (the examples are independent).
- `make TARGET` runs as `make -n TARGET`; a benchmark script runs with `--help`.
- A command the docs show failing (`# llmstack: error: ...`) must fail with that line.
- Nothing that installs packages runs (pip is a failing stub in the scratch PATH).
- NOT_RUN lists what cannot run here, with the reason; synopses (`...`, `<name>`, `DIR`) are not
  commands. Anything else runs as written, so a new example is run unless someone lists it.
Commands run in three phases (data, training, everything else), each in the documents' order, so
a run exists before the examples that read it.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.doc_commands import DocCommand, extract
from tests.helpers import ROOT, TEST_DATA_DIR
from tests.test_hf_data import example_dir

NOT_RUN = {
    "wandb login": "interactive, and stores a key for wandb.ai (network)",
    "wandb sync runs/sft/wandb/offline-run-*": "uploads to wandb.ai (network); the offline run it syncs is checked "
                                               "by tests/test_recipes.py",
    "PY=python3 PYTHONPATH=. scripts/bench_gpu.sh": "benchmarks on a CUDA device (the script exits at once without one)",
    "PY=python3 PYTHONPATH=. scripts/bench_gpu.sh kernels": "one part of the GPU benchmarks, as above",
    "python scripts/compile_check.py --full --write": "the full compile sweep takes 25-50 min on 2 cores; "
                                                      "tests/kernels/test_compile_gate.py runs its subset",
    "pip install .": "installs into the running environment; tests/test_packaging.py builds this wheel and "
                     "installs it into a temporary folder instead",
    'pip install -e ".[serve]"': "installs into the running environment (make install already adds the serve extra)",
    "llmstack serve --checkpoint runs/tiny --port 8000": "a server that runs until stopped; tests/test_serve.py starts "
                                                        "it and talks to it with the openai client",
    "llmstack serve --checkpoint runs/tiny --api-key-env LLMSTACK_KEY": "a server, as above (auth: tests/test_serve.py)",
    "python runs/x/checkpoints/zero_to_fp32.py runs/x/checkpoints out --safe_serialization":
        "needs a pure-ZeRO run in runs/x; tests/parallel checks DeepSpeed's script against checkpoint consolidate",
    "python -m sglang.launch_server --model-path out/hf_tiny --served-model-name tiny --tp 8":
        "SGLang is a GPU server, not installed here; transformers loads the same folder in tests/test_hf_export.py",
    "python -m sglang.launch_server --model-path out/sft-hf --port 30000": "SGLang (GPU server), as above",
    "python -m sglang.launch_server --model-path out/sft-gptq --quantization gptq --dtype float16":
        "SGLang (GPU server); the GPTQ folder is loaded by transformers + gptqmodel in tests/test_gptq_format.py",
}
# never run, whatever the rules say: they change the environment the tests run in
_INSTALLS = re.compile(r"\b(pip3?|conda|apt(-get)?|uv)\b.*\binstall\b")
MAX_PARAMS = 50e6  # larger models are planned, not trained, here
TIMEOUT_S = 300  # per command; the slowest here (a recipe's first tokenization + 2 steps) takes ~40 s
STEPS = {"train.max_steps": 2, "schedule.warmup_steps": 1, "train.eval_every": 2, "train.eval_batches": 1, "checkpoint.every_steps": 2,
         "train.log_every": 1, "train.sample_tokens": 4, "train.progress": False, "data.num_proc": 1}
TINY = {"data.dir": str(TEST_DATA_DIR), "data.max_files": 120, "data.seq_len": 64, "model.vocab_size": 512,
        "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.max_seq_len": 128,
        "train.micro_batch_size": 4, "schedule.warmup_steps": 1}
# files the examples name as the reader's own
FIXTURES = {
    "notes.txt": lambda p: p.write_text("def main():\n    return 0\n" * 20),
    "my_chats.jsonl": lambda p: shutil.copy(example_dir() / "chat.jsonl", p),
    "path/to/hf-model": lambda p: shutil.copytree(example_dir() / "tiny-llama", p),
}
LINKED = ("configs", "scripts", "docs", "Makefile", "pyproject.toml", "README.md")


def _llmstack_args(argv: list[str]) -> list[str] | None:
    """The arguments after `llmstack` in any of the ways the docs start it, else None."""
    for i, tok in enumerate(argv):
        if tok in ("llmstack", ".venv/bin/llmstack"):
            return argv[i + 1:]
        if tok == "-m" and i + 1 < len(argv) and argv[i + 1] == "llmstack":
            return argv[i + 2:]
        if tok == "--module" and i + 1 < len(argv) and argv[i + 1] == "llmstack":
            return argv[i + 2:]
    return None


def _env_prefix(argv: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        k, _, v = argv[0].partition("=")
        env[k] = v
        argv = argv[1:]
    return env, argv


def _launcher_world(argv: list[str]) -> int | None:
    """World size of a GPU launcher command, None for anything else."""
    if argv[0].startswith("scripts/launch_") and argv[0].endswith(".sh"):
        return int(argv[1])
    if argv[:2] == ["sbatch", "scripts/slurm.sbatch"]:
        text = (ROOT / "scripts" / "slurm.sbatch").read_text()
        nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
        return nodes * int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    if argv[0] == "deepspeed" and "--num_gpus" in argv:
        return int(argv[argv.index("--num_gpus") + 1])
    return None


def _train_args(argv: list[str]) -> list[str]:
    """The llmstack train arguments of a launcher command (after the launcher's own)."""
    if argv[0] == "deepspeed":
        return _llmstack_args(argv)[1:]
    return argv[2:]


def _config_of(args: list[str]):
    from llmstack.config import CONFIGS_DIR, load_config
    config = args[args.index("--config") + 1] if "--config" in args else CONFIGS_DIR / "tiny.yaml"
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return load_config(ROOT / config if not Path(config).is_absolute() else config, overrides)


def _num_params(cfg) -> int:
    import torch
    from llmstack.model import Llama
    with torch.device("meta"):
        return Llama(cfg.model).num_params()


def plan_for(cmd: DocCommand, used_run_dirs: set) -> tuple[str, str]:
    """(shell line to run, what the rule did) for one documented command."""
    env, argv = _env_prefix(cmd.argv)
    world = _launcher_world(argv)
    if world is not None:
        args = _train_args(argv)
        return shlex.join(["llmstack", "plan", "--gpus", str(world), *args]), f"dry run: plan on {world} ranks"
    if argv[0] == "make":
        return shlex.join(["make", "-n", *argv[1:]]), "dry run: make -n"
    if argv[0] == "python" and len(argv) > 1 and re.match(r"scripts/bench_\w+\.py$", argv[1]):
        return shlex.join(["python", argv[1], "--help"]), "benchmark: --help"
    args = _llmstack_args(argv)
    if args and args[0] in ("train", "distill", "data") and cmd.expect_error is None:
        cfg = _config_of(args[1:])
        if _num_params(cfg) > MAX_PARAMS:
            return shlex.join(["llmstack", "plan", *args[1:]]), "dry run: plan (model too large to train here)"
        extra = dict(STEPS)
        if cfg.data.source == "stdlib":
            extra.update(TINY)
        if args[0] != "data":
            run_dir = str(cfg.run_dir)
            if run_dir in used_run_dirs:
                extra["out_dir"] = f"{run_dir}-{len(used_run_dirs)}"
            used_run_dirs.add(extra.get("out_dir", run_dir))
        appended = [f"{k}={v}" for k, v in extra.items()]
        return cmd.text + " " + shlex.join(appended), "shrunk: " + " ".join(appended)
    return cmd.text, "as written"


def _phase(cmd: DocCommand, outputs: set[str], late_runs: set[str]) -> int:
    """0 data, 1 training, 2 everything that reads a run, 3 training that starts from the output
    of a phase-2 command (`init_from` = some command's `--out`, e.g. recovery after pruning),
    4 what reads a phase-3 run."""
    args = _llmstack_args(cmd.argv) or []
    if "make_example_data.py" in cmd.text or args[:1] == ["data"]:
        return 0
    if args[:1] in (["train"], ["distill"]):
        return 3 if _init_from(cmd) in outputs else 1
    return 4 if any(a.rstrip("/") in late_runs for a in cmd.argv) else 2


def _init_from(cmd: DocCommand) -> str | None:
    args = _llmstack_args(cmd.argv) or []
    if args[:1] not in (["train"], ["distill"]) or cmd.expect_error is not None:
        return None
    return _config_of(args[1:]).init_from


def _order(cmds: list[DocCommand]) -> list[DocCommand]:
    outputs = {a[a.index("--out") + 1] for a in (c.argv for c in cmds) if "--out" in a[:-1]}
    late = [c for c in cmds if _init_from(c) in outputs]
    late_runs = {str(_config_of(_llmstack_args(c.argv)[1:]).run_dir) for c in late}
    return sorted(cmds, key=lambda c: _phase(c, outputs, late_runs))  # stable: documents' order within a phase


def _sandbox(root: Path) -> dict:
    for name in LINKED:
        (root / name).symlink_to(ROOT / name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # shims, not links: a linked venv python would look for pyvenv.cfg here and lose its packages
    for name, module in (("python", None), ("llmstack", "llmstack"), ("torchrun", "torch.distributed.run")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {f"-m {module} " if module else ""}"$@"\n')
        (bin_dir / name).chmod(0o755)
    for name in ("pip", "pip3"):  # a documented pip call that slipped past _INSTALLS fails instead of installing
        (bin_dir / name).write_text('#!/bin/sh\necho "pip is not run by the docs test: list the command in NOT_RUN" >&2\nexit 97\n')
        (bin_dir / name).chmod(0o755)
    for rel, make in FIXTURES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        make(root / rel)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(line: str, cwd: Path, env: dict) -> subprocess.CompletedProcess | None:
    """Run one shell line; None if it outlived TIMEOUT_S (then its whole process group is killed)."""
    proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _commands() -> list[DocCommand]:
    return extract(ROOT)


def test_the_documents_show_commands_and_the_extractor_reads_each_kind():
    cmds = {c.text: c for c in _commands()}
    where = {w.split(":")[0] for c in cmds.values() for w in c.where}
    for f in ("README.md", "docs/hf_and_recipes.md", "scripts/slurm.sbatch", "scripts/launch_torchrun.sh",
              "configs/recipes/sft.yaml", "llmstack/parallel/plan.py"):
        assert f in where, f"no command found in {f}"
    shown_failing = [c for c in cmds.values() if c.expect_error]
    assert shown_failing and all(c.expect_error.startswith("llmstack: error:") for c in shown_failing)


def test_not_run_entries_name_documented_commands():
    texts = {c.text for c in _commands()}
    stale = [k for k in NOT_RUN if k not in texts]
    assert not stale, f"NOT_RUN names commands no document shows any more: {stale}"


def test_scripts_are_valid_shell():
    for path in [*ROOT.glob("scripts/*.sh"), *ROOT.glob("scripts/*.sbatch")]:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path):
    env = _sandbox(tmp_path)
    cmds = [c for c in _commands() if not c.synopsis and c.text not in NOT_RUN]
    used: set = set()
    failures, log, done = [], [], set()
    for cmd in _order(cmds):
        if _INSTALLS.search(cmd.text):
            failures.append(f"{', '.join(cmd.where)}: `{cmd.text}` installs packages: list it in NOT_RUN")
            continue
        line, how = plan_for(cmd, used)
        if line in done:  # e.g. a script and its --write form both run as `--help`
            continue
        done.add(line)
        t0 = time.perf_counter()
        proc = _run(line, tmp_path, env)
        if proc is None:
            failures.append(f"{', '.join(cmd.where)}: `{cmd.text}` [{how}] still running after {TIMEOUT_S} s, killed "
                            "(a server or a full-size run? give it a rule or list it in NOT_RUN)")
            continue
        log.append(f"{time.perf_counter() - t0:5.1f}s exit {proc.returncode}  {cmd.where[0]}: {cmd.text}  [{how}]")
        if cmd.expect_error is not None:
            ok = proc.returncode == 2 and proc.stderr.strip().splitlines()[-1:] and \
                proc.stderr.strip().splitlines()[-1].startswith(cmd.expect_error)
        else:
            ok = proc.returncode == 0
        if not ok:
            failures.append(f"{', '.join(cmd.where)}: `{cmd.text}` [{how}] exit {proc.returncode}\n"
                            f"{(proc.stdout + proc.stderr)[-1500:]}")
    print("\n".join(log))
    assert not failures, f"{len(failures)} of {len(cmds)} documented commands failed:\n\n" + "\n\n".join(failures)
