import json

import pytest
import torch

from llmstack.perf import peak_flops
from llmstack.train import train
from tests.helpers import read_metrics, tiny_config


def test_cpu_peak_is_measured_and_cached():
    a = peak_flops(torch.device("cpu"))
    assert a["peak"] > 1e9 and "measured" in a["source"]
    assert peak_flops(torch.device("cpu")) == a


def test_profile_writes_trace_and_top_ops(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 6, "train.profile": True, "train.profile_steps": [2, 4]}))
    trace = json.loads((tmp_path / "profile_trace.json").read_text())
    assert trace["traceEvents"]
    assert "aten::mm" in (tmp_path / "profile_top_ops.txt").read_text()
    mfu = [r["mfu"] for r in read_metrics(tmp_path) if "mfu" in r]
    assert all(0 < m < 2 for m in mfu)


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path):
    steps = {"train.max_steps": 4, "train.eval_every": 4}
    eager = train(tiny_config(tmp_path / "eager", **steps))
    compiled = train(tiny_config(tmp_path / "compiled", **{"train.compile": True, **steps}))
    assert abs(eager["final_val_loss"] - compiled["final_val_loss"]) < 1e-3 * eager["final_val_loss"]
