import pytest

from llmstack.config import CONFIGS_DIR, ConfigError, load_config


def test_defaults_include_and_overrides():
    cfg = load_config(CONFIGS_DIR / "tiny.yaml", ["train.max_steps=7", "schedule.warmup_steps=2", "optim.lr=3e-4", "model.n_kv_heads=4"])
    assert cfg.model.name == "tiny" and cfg.model.dim == 128  # from model/tiny.yaml
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.model.n_kv_heads == 4
    assert cfg.run_dir.as_posix() == "runs/tiny"


@pytest.mark.parametrize("override, names", [
    (["train.max_stepz=3"], "train.max_stepz"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["train.max_steps=1.5"], "train.max_steps"),
    (["precision=fp16"], "precision"),
    (["optim.lr=-1"], "optim.lr"),
    (["train.resume=maybe"], "train.resume"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["data.seq_len=4096"], "data.seq_len"),
    (["parallel.tp=0"], "parallel.tp"),
    (["parallel.pp=0"], "parallel.pp"),
    (["kernels.backend=cuda"], "kernels.backend"),
    (["train.nonfinite=ignore"], "train.nonfinite"),
    (["nonsense"], "nonsense"),
])
def test_bad_values_name_the_key_in_one_line(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS_DIR / "tiny.yaml", override)
    msg = str(e.value)
    assert names in msg and "\n" not in msg


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("defaults: [model/nope.yaml]\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(bad)


def test_every_shipped_config_loads():
    for path in sorted(CONFIGS_DIR.rglob("*.yaml")):
        load_config(path)


def test_deep_merge_merges_nested_dicts_and_leaves_base_alone():
    from llmstack.config import deep_merge
    base = {"zero_optimization": {"stage": 1, "overlap_comm": False}, "bf16": {"enabled": True}}
    out = deep_merge(base, {"zero_optimization": {"stage": 3}, "bf16": False})
    assert out == {"zero_optimization": {"stage": 3, "overlap_comm": False}, "bf16": False}
    assert base["zero_optimization"]["stage"] == 1
