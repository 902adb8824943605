"""A distributed checkpoint, consolidated, continues as a one-process run on the same loss curve."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmstack.config import from_dict
from llmstack.model import Llama
from tests.helpers import ROOT, train_losses
from tests.parallel import launch

pytestmark = pytest.mark.slow
STEPS, SAVE_AT = 8, 4


@pytest.mark.parametrize("nproc, extra", [
    (2, {"parallel.tp": 2}),
    # the micro-batch is widened by dp on consolidation so the data order carries on
    (2, {"parallel.zero_stage": 1, "train.micro_batch_size": 2, "train.grad_accum_steps": 2}),
    # the tied embedding lives on both stages: one tensor in the consolidated checkpoint
    (2, {"parallel.pp": 2, "model.tie_embeddings": True, "train.micro_batch_size": 4, "train.grad_accum_steps": 2}),
], ids=["tp2", "zero1_dp2_accum2", "pp2_tied"])
def test_consolidated_checkpoint_resumes_with_one_process(nproc, extra, tmp_path):
    common = {"train.max_steps": STEPS, "checkpoint.every_steps": SAVE_AT, "checkpoint.keep_last": 3,
              "train.eval_every": STEPS}
    dist_run = tmp_path / "distributed"
    proc = launch.train(nproc, dist_run, **{**extra, **common})
    assert proc.returncode == 0, launch.tail(dist_run)
    unmerged = launch.train(1, tmp_path / "refused", **{**common, "train.resume": str(dist_run)})
    errors = [x for x in unmerged.stderr.splitlines() if x.startswith("llmstack: error:")]
    assert unmerged.returncode == 2 and len(errors) == 1 and "checkpoint consolidate" in errors[0], unmerged.stderr[-2000:]
    assert "Traceback" not in unmerged.stderr
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").glob("checkpoints/*"))
    merged = tmp_path / "consolidated"
    proc = subprocess.run([sys.executable, "-m", "llmstack", "checkpoint", "consolidate",
                           str(dist_run / "checkpoints" / f"step_{SAVE_AT}"), str(merged)],
                          capture_output=True, text=True, cwd=ROOT, env=launch.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((merged / "trainer_state.json").read_text())["step"] == SAVE_AT

    single = tmp_path / "single"
    dp = nproc // (extra.get("parallel.tp", 1) * extra.get("parallel.pp", 1))
    one_process = {k: v for k, v in extra.items() if k.startswith("model.")}  # the layout goes, the model stays
    one_process["train.micro_batch_size"] = extra.get("train.micro_batch_size", 8) * dp  # what the config says
    one_process["train.grad_accum_steps"] = extra.get("train.grad_accum_steps", 1)
    proc = launch.train(1, single, **{**one_process, **common, "train.resume": str(merged)})
    assert proc.returncode == 0, launch.tail(single)
    assert f"resumed from {merged} at step {SAVE_AT}" in launch.tail(single, 10**6)
    before, after = train_losses(dist_run), train_losses(single)
    assert sorted(after) == list(range(SAVE_AT + 1, STEPS + 1)), after
    diff = launch.rel_diff(after, {k: before[k] for k in after})
    assert diff <= 1e-5, (after, before)


@pytest.mark.parametrize("name", ["zero3_dp2_fused", "tp2", "pp2"])
def test_parameter_count_is_the_whole_model(name, layout_run):
    """ZeRO-3 partitions every parameter and TP/PP shard them: the count is the model's, not a rank's."""
    out = layout_run(name)["out"]
    whole = Llama(from_dict(yaml.safe_load((out / "config.yaml").read_text())).model).num_params()
    assert json.loads((out / "summary.json").read_text())["params"] == whole
    assert f": {whole:,} params;" in launch.tail(out, 10**6)


def test_deepspeeds_zero_to_fp32_equals_consolidate(layout_run, tmp_path):
    """DeepSpeed's own recovery script, kept beside the checkpoints of a ZeRO run, writes the same
    weights as `llmstack checkpoint consolidate`, bit for bit; TP/PP runs do not keep it (it would
    merge data-parallel partitions only)."""
    out = layout_run("zero3_dp2_fused")["out"]
    ckpts = out / "checkpoints"
    proc = subprocess.run([sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "fp32"),
                           "--safe_serialization"], capture_output=True, text=True, cwd=tmp_path, env=launch.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "llmstack", "checkpoint", "consolidate", str(out), str(tmp_path / "ours")],
                          capture_output=True, text=True, cwd=ROOT, env=launch.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs, ours = load_file(tmp_path / "fp32" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(theirs) == sorted(ours)
    diff = max(float((theirs[k].float() - ours[k].float()).abs().max()) for k in ours)
    print(f"zero_to_fp32 vs consolidate: {len(ours)} tensors, max abs difference {diff}")
    assert all(theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]) for k in ours)
    for name in ("tp2", "pp2"):
        assert not list((layout_run(name)["out"] / "checkpoints").glob("zero_to_*.py"))
