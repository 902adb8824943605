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


# The test model (tests/helpers.py tiny_overrides): dim 64, 2 layers, 4 heads of 16, 2 KV heads,
# vocab 512, untied head, SwiGLU width 8/3 * 64 = 170 rounded up to a multiple of 32 = 192.
#   matmul weights per layer: wq 64x64 + wk 64x32 + wv 64x32 + wo 64x64 = 12,288
#                             w1, w3, w2: 3 x 64x192                    = 36,864
#   2 layers: 98,304; LM head 512x64: 32,768; total 131,072 (the embedding is a lookup)
#   training: 6 FLOPs per weight per token (2 forward, 4 backward)      = 786,432
#   attention scores and values: 12 x layers x dim x seq_len = 12x2x64x64 = 98,304
HAND_FLOPS_PER_TOKEN = 884_736
# llmstack's count also includes the norm weights, 6 x (2 x 2 x 64 + 64) = 1,920 (0.2%)
FLOPS_TOL = 0.005


def test_mfu_matches_a_hand_count_of_the_flops(tmp_path):
    micro, accum, seq = 4, 2, 64
    summary = train(tiny_config(tmp_path, **{"train.max_steps": 3, "train.eval_every": 3, "train.micro_batch_size": micro,
                                             "train.grad_accum_steps": accum, "data.seq_len": seq}))
    peak = summary["peak_flops"]["peak"]
    rows = [r for r in read_metrics(tmp_path) if "mfu" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["tokens"] == r["step"] * micro * accum * seq
        flops_per_token = r["mfu"] * peak / r["tokens_per_s"]
        assert abs(flops_per_token / HAND_FLOPS_PER_TOKEN - 1) < FLOPS_TOL, (r, flops_per_token)
    tokens = 3 * micro * accum * seq
    assert abs(summary["tokens_per_s"] * summary["wall_s"] / tokens - 1) < 1e-6
    flops = summary["mfu"] * peak * summary["wall_s"]
    assert abs(flops / (tokens * HAND_FLOPS_PER_TOKEN) - 1) < FLOPS_TOL, (flops, tokens * HAND_FLOPS_PER_TOKEN)


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path):
    steps = {"train.max_steps": 4, "train.eval_every": 4}
    eager = train(tiny_config(tmp_path / "eager", **steps))
    compiled = train(tiny_config(tmp_path / "compiled", **{"train.compile": True, **steps}))
    assert abs(eager["final_val_loss"] - compiled["final_val_loss"]) < 1e-3 * eager["final_val_loss"]
