import json
import math
import os
import signal

import pytest
import torch

from llmstack.config import CONFIGS_DIR, load_config
from llmstack.data import Batch
from llmstack.engine import LocalEngine
from llmstack.model import Llama
from llmstack.train import TrainingAborted, lr_at, train
from tests.helpers import read_metrics, tiny_config, train_losses


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    summary = train(tiny_config(run, **{"train.max_steps": 30, "train.eval_every": 15}))
    return run, summary


def test_short_run_val_loss_falls_and_writes_outputs(reference_run):
    run, summary = reference_run
    vals = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert vals[-1] < vals[0] and vals[-1] < math.log(512) - 0.5  # ln(512) = loss of a uniform guess
    assert summary["final_val_loss"] < math.log(512)  # better than uniform over the vocab
    for f in ("metrics.jsonl", "summary.json", "config.yaml", "loss.png", "checkpoints/latest"):
        assert (run / f).exists(), f
    rec = next(r for r in read_metrics(run) if "loss" in r)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes"} <= set(rec)
    s = json.loads((run / "summary.json").read_text())
    assert {"final_train_loss", "final_val_loss", "val_ppl", "tokens_per_s", "params", "steps", "wall_s", "kernels"} <= set(s)
    assert s["kernels"]["attention"] == "torch"


class SigtermOnCall(Llama):
    """Sends this process SIGTERM (a preemption) during a chosen training forward call."""
    at_call = 0

    def forward(self, *args, **kwargs):
        self._calls = getattr(self, "_calls", 0) + self.training  # training forwards only
        if self.training and self._calls == self.at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(*args, **kwargs)


def test_preemption_saves_and_resume_continues_the_same_curve(reference_run, tmp_path):
    run, _ = reference_run
    cfg = tiny_config(tmp_path, **{"train.max_steps": 30, "train.eval_every": 15, "checkpoint.every_steps": 100})
    SigtermOnCall.at_call = 13
    first = train(cfg, model_class=SigtermOnCall)
    assert first["interrupted"] and first["signal"] == signal.SIGTERM and first["steps"] == 13
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_13"
    second = train(cfg)
    assert not second["interrupted"] and second["steps"] == 30
    assert train_losses(tmp_path) == train_losses(run)  # bit-identical per-step losses


def _batch(x, y):
    return Batch(x, y)


def test_grad_accumulation_normalizes_by_global_target_tokens():
    """Uneven masking across micro-batches: accum=2 must equal one batch holding both (the loss is
    normalised by the global batch's target tokens, not averaged per micro-batch)."""
    cfg = tiny_config("/tmp/unused", **{"optim.grad_clip": 0.0})
    torch.manual_seed(0)
    x = torch.randint(0, 512, (4, 16))
    y = torch.randint(0, 512, (4, 16))
    y[:2, 3:] = -100  # first micro-batch almost fully masked
    grads = []
    for split in (False, True):
        torch.manual_seed(1)
        model = Llama(cfg.model)
        engine = LocalEngine(cfg, model, torch.device("cpu"))
        micro = [_batch(x[:2], y[:2]), _batch(x[2:], y[2:])] if split else [_batch(x, y)]
        params_before = [p.detach().clone() for p in model.parameters()]
        result = engine.train_step(micro, lr=0.0)  # lr 0: compare losses and norms only
        grads.append((result.loss, result.grad_norm, result.n_tokens))
        assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    (l1, n1, t1), (l2, n2, t2) = grads
    assert t1 == t2 == 2 * 3 + 2 * 16
    assert abs(l1 - l2) < 1e-5 and abs(n1 - n2) < 1e-5 * max(n1, 1)


def test_accum4_mb2_equals_accum1_mb8(tmp_path):
    a = train(tiny_config(tmp_path / "a", **{"train.max_steps": 4, "train.micro_batch_size": 8,
                                            "train.grad_accum_steps": 1, "train.eval_every": 4}))
    b = train(tiny_config(tmp_path / "b", **{"train.max_steps": 4, "train.micro_batch_size": 2,
                                            "train.grad_accum_steps": 4, "train.eval_every": 4}))
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    for step in la:
        assert abs(la[step] - lb[step]) < 1e-5 * abs(la[step]), (step, la[step], lb[step])
    assert abs(a["final_val_loss"] - b["final_val_loss"]) < 1e-4


class NanOnCalls(Llama):
    """Returns a NaN loss on chosen forward calls, to exercise the non-finite policy."""
    nan_calls: set = set()

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self._calls = getattr(self, "_calls", 0) + self.training  # training forwards only
        if self.training and self._calls in self.nan_calls:
            out = out * float("nan")
        return out


def test_nonfinite_step_is_skipped_and_logged(tmp_path):
    NanOnCalls.nan_calls = {3}
    summary = train(tiny_config(tmp_path, **{"train.max_steps": 6, "train.eval_every": 6}), model_class=NanOnCalls)
    events = [r for r in read_metrics(tmp_path) if r.get("event") == "nonfinite"]
    assert [e["step"] for e in events] == [3]
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["final_val_loss"])


def test_nonfinite_abort_saves_last_good_state(tmp_path):
    NanOnCalls.nan_calls = {4}
    cfg = tiny_config(tmp_path, **{"train.max_steps": 6, "train.nonfinite": "abort", "checkpoint.every_steps": 100})
    with pytest.raises(TrainingAborted, match="step 4"):
        train(cfg, model_class=NanOnCalls)
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_4"
    state = json.loads((tmp_path / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_bf16_tracks_fp32(tmp_path):
    steps = {"train.max_steps": 15, "train.eval_every": 15}
    train(tiny_config(tmp_path / "fp32", **steps))
    train(tiny_config(tmp_path / "bf16", precision="bf16", **steps))
    a, b = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    for step in a:
        assert abs(a[step] - b[step]) < 0.03 * a[step], (step, a[step], b[step])


def test_schedules():
    cfg = load_config(CONFIGS_DIR / "tiny.yaml", ["train.max_steps=100", "schedule.warmup_steps=10",
                                                 "optim.lr=1.0", "schedule.min_lr_ratio=0.1"])
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 99) == pytest.approx(0.1, abs=1e-3)
    wsd = load_config(CONFIGS_DIR / "tiny.yaml", ["train.max_steps=100", "schedule.kind=wsd", "schedule.warmup_steps=10",
                                                 "optim.lr=1.0", "schedule.min_lr_ratio=0.0", "schedule.decay_fraction=0.2"])
    assert lr_at(wsd, 50) == 1.0 and lr_at(wsd, 79) == 1.0 and lr_at(wsd, 90) == pytest.approx(0.5)


def test_param_groups_decay_matrices_once_each():
    """The AdamW grouping both engines use: matrices decay, gains do not, a tied weight once."""
    from llmstack.engine import param_groups
    from llmstack.model import Llama
    cfg = tiny_config("/tmp/unused", **{"model.tie_embeddings": True})
    model = Llama(cfg.model)
    model.norm.weight.requires_grad_(False)
    groups, names = param_groups(list(model.named_parameters(remove_duplicate=False)), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    flat = decay["params"] + no_decay["params"]
    assert len({id(p) for p in flat}) == len(flat) == len(names)
    ids = {id(p) for p in flat}
    assert id(model.norm.weight) not in ids and id(model.output.weight) in ids
    assert [names[i] for i in range(len(flat))][:1] == ["tok_embeddings.weight"]


def test_deterministic_setting_is_restored_after_train(tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    train(tiny_config(tmp_path / "run", **{"train.max_steps": 1, "train.deterministic": True}))
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting, not the run's


def test_a_second_layout_in_one_process_is_refused(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from llmstack.parallel import topology
    from llmstack.parallel.plan import LayoutError
    monkeypatch.setattr(topology, "_CURRENT", SimpleNamespace(tp=1, pp=1, dp=2))
    assert topology.init_topology(tiny_config(tmp_path, **{"parallel.zero_stage": 1})) is topology._CURRENT
    with pytest.raises(LayoutError, match="already runs tp=1 pp=1 dp=2; tp=2 pp=1"):
        topology.init_topology(tiny_config(tmp_path, **{"parallel.tp": 2}))
