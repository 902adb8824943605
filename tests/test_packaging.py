"""A non-editable install carries the configs: the wheel holds llmstack/configs, and llmstack
installed from it (outside the repository) finds configs/tiny.yaml, its includes and the recipes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

CHECK = """
import json, llmstack
from llmstack.config import CONFIGS_DIR, load_config
cfg = load_config(CONFIGS_DIR / "tiny.yaml")  # includes model/tiny.yaml
recipes = sorted(p.name for p in (CONFIGS_DIR / "recipes").glob("*.yaml"))
print(json.dumps({"file": llmstack.__file__, "configs": str(CONFIGS_DIR), "model": cfg.model.name, "recipes": recipes}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip install .` would build, built from a copy of the sources (no build/ in the repo)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("llmstack", "configs"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("llmstack-*.whl")
    return whl


def test_wheel_holds_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert shipped and {f"llmstack/{n}" for n in shipped} <= names, sorted(shipped - {n[9:] for n in names})


def test_installed_package_finds_its_configs(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # only the installed copy on the path, run from outside the repository
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(site)), info
    assert info["configs"].startswith(str(site)) and info["model"] == "tiny", info
    assert "sft.yaml" in info["recipes"], info
    proc = subprocess.run([sys.executable, "-m", "llmstack", "plan"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0 and "layout: tp=1" in proc.stdout, proc.stderr[-2000:]
