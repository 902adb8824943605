"""`llmstack plan` and the layout check: bad layouts are one line, exit status 2."""
import pytest

from tests.helpers import run_cli, tiny_config


def _plan(*args):
    return run_cli("plan", "--config", "configs/tiny.yaml", *args, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["--gpus", "4", "parallel.tp=3"], "parallel.tp"),
    (["--gpus", "6", "parallel.tp=4"], "does not divide"),
    (["--gpus", "4", "parallel.pp=3"], "parallel.pp"),
    (["--gpus", "4", "parallel.pp=2", "parallel.zero_stage=2"], "zero_stage"),
    (["--gpus", "8", "parallel.tp=2", "parallel.dp=2"], "parallel.dp"),
    (["--gpus", "2", "parallel.tp=2", "model.n_kv_heads=1"], "n_kv_heads"),
    (["--gpus", "2", "parallel.sequence_parallel=true"], "sequence_parallel"),  # needs tp > 1
    (["--gpus", "2", "parallel.sequence_parallel=true", "parallel.tp=2", "data.seq_len=63"], "sequence_parallel"),
])
def test_plan_rejects_bad_layouts_in_one_line(args, needle, capsys):
    from llmstack.errors import UserError
    from llmstack.cli.checkpoint import plan_main
    with pytest.raises(UserError) as e:
        plan_main(["--config", "configs/tiny.yaml", *args])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_plan_cli_exits_2_with_one_line():
    proc = _plan("--gpus", "4", "parallel.tp=3")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmstack: error: parallel.tp"), proc.stderr


def test_plan_prints_per_rank_memory(capsys):
    from llmstack.cli.checkpoint import plan_main
    assert plan_main(["--config", "configs/tiny.yaml", "--gpus", "8", "--gpu-mem", "80GB", "parallel.tp=2",
                      "parallel.pp=2", "parallel.zero_stage=1"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "grads", "optimizer", "activations", "global batch", "fits"):
        assert word in out


def test_check_layout_returns_dp_and_memory_shrinks_with_zero(tmp_path):
    from llmstack.parallel.plan import check_layout, per_rank_estimate
    cfg = tiny_config(tmp_path, **{"parallel.tp": 2})
    assert check_layout(cfg, 8) == 4
    z0 = per_rank_estimate(cfg, 8)
    cfg.parallel.zero_stage = 3
    z3 = per_rank_estimate(cfg, 8)
    assert z3["optimizer"] < z0["optimizer"] and z3["weights"] < z0["weights"]


@pytest.mark.parametrize("override, world, needle", [
    (["parallel.pp=2", "parallel.zero_stage=2"], 2, "parallel.zero_stage: got 2 with parallel.pp=2"),
    (["parallel.tp=3"], 3, "parallel.tp: 3 does not divide model.n_heads=4"),
])
def test_layout_rules_are_checked_by_check_layout_not_config_loading(override, world, needle):
    from llmstack.config import CONFIGS_DIR, load_config
    from llmstack.parallel.plan import LayoutError, check_layout
    cfg = load_config(CONFIGS_DIR / "tiny.yaml", override)  # structurally valid: loads
    with pytest.raises(LayoutError, match=needle):
        check_layout(cfg, world)


def test_tensor_parallel_sharding_uses_the_same_rule(tmp_path):
    from llmstack.model import Llama
    from llmstack.parallel.plan import LayoutError
    from llmstack.parallel.tensor_parallel import apply_tensor_parallel
    cfg = tiny_config(tmp_path)
    # n_kv_heads=2: the rule's own message, with its hint, before any process group is touched
    with pytest.raises(LayoutError, match=r"n_kv_heads=2 \(key/value heads are not replicated"):
        apply_tensor_parallel(Llama(cfg.model), None, 0, 4)
