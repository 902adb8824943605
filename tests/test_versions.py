"""The version floor is checked before any command runs, in one line naming the package, and the
ranges llmstack checks are the ones pyproject.toml installs."""
import re
import tomllib

import pytest

from llmstack import versions
from llmstack.cli import main
from tests.helpers import ROOT


# each command would fail at once on its own input too, so a missing check cannot start any work
@pytest.mark.parametrize("command", [["eval", "--checkpoint", "runs/none"], ["train", "train.max_stepz=1"]])
def test_too_old_torch_is_one_line_before_any_command(command, monkeypatch, capsys):
    real = versions.version
    monkeypatch.setattr(versions, "version", lambda pkg: "2.4.1+cu121" if pkg == "torch" else real(pkg))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "torch 2.4.1+cu121" in err and ">= 2.5" in err and "enable_gqa" in err, err


def test_supported_torch_passes():
    assert "torch" in versions.check_versions()


def test_pyproject_states_the_checked_ranges():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pkg, (lo, hi) in versions.TESTED.items():
        spec = next((d for d in deps if re.match(rf"{pkg}\b", d)), None)
        assert spec is not None, f"pyproject.toml does not list {pkg}"
        floor = re.search(r">=\s*([\d.]+)", spec).group(1).split(".")
        assert tuple(int(x) for x in floor[:2]) == lo, (spec, lo)
        ceiling = re.search(r"<\s*([\d.]+)", spec)
        if ceiling:
            assert tuple(int(x) for x in ceiling.group(1).split(".")[:2]) == hi, (spec, hi)
