"""Separate Python environments for the tests that load what we write with other stacks: the oldest
transformers that pyproject allows, and transformers + optimum + gptqmodel (the GPTQ loader, whose
pins clash with the main environment's numpy).

Each is created once per requirement set under $LLMSTACK_VENV_CACHE (default
~/.cache/llmstack-venvs), in a temporary folder renamed into place, and reused by later runs. If
one cannot be created (no package index reachable), the test is skipped with pip's last line.

    python -m tests.compat_venv [NAME ...]     # create them ahead of time
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# torch 2.13.0 is the CPU build the main environment uses (pip takes it from the local wheel cache)
VENVS = {
    "transformers-4.45": ["torch==2.13.0", "transformers==4.45.2", "safetensors", "peft==0.13.2"],
    "gptqmodel": ["torch==2.13.0", "transformers==5.24.0", "optimum==2.3.0", "gptqmodel==7.6.0"],
}


def cache_root() -> Path:
    return Path(os.environ.get("LLMSTACK_VENV_CACHE", Path.home() / ".cache" / "llmstack-venvs"))


def venv_dir(name: str) -> Path:
    key = hashlib.sha256(json.dumps([sys.version_info[:2], VENVS[name]]).encode()).hexdigest()[:10]
    return cache_root() / f"{name}-{key}"


def create(name: str) -> Path:
    """The environment's python, creating the environment if needed; RuntimeError if pip fails."""
    final = venv_dir(name)
    py = final / "bin" / "python"
    if py.exists():
        return py
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
    r = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *VENVS[name]],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise RuntimeError(f"cannot create the {name} environment ({' '.join(VENVS[name])}): {last}")
    try:
        tmp.rename(final)
    except OSError:  # another run created it first
        shutil.rmtree(tmp, ignore_errors=True)
    return py


def python_of(name: str) -> Path:
    """For tests: the environment's python, or a skip naming why it could not be created."""
    import pytest
    try:
        return create(name)
    except (RuntimeError, subprocess.SubprocessError) as e:
        pytest.skip(str(e))


def run_script(name: str, script: str, *args: str, timeout: float = 900) -> dict:
    """Run `script` (Python source) in the environment; it prints one JSON line last, returned."""
    py = python_of(name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([str(py), "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=str(cache_root()))
    assert r.returncode == 0, f"{name} environment script failed:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    for n in sys.argv[1:] or list(VENVS):
        print(create(n))
