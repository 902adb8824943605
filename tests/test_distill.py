"""Distillation: the student's training loss is the fused CE + KD against a frozen teacher that
is neither a submodule nor saved nor optimized; tokenizer checks; the CLI end to end."""
import json
from types import SimpleNamespace

import pytest
import torch

from llmstack.data import Tokenizer
from llmstack.distill import DistillError, DistillStudent, attach_teacher, check_compatible
from llmstack.kernels.kd_loss import kd_loss_reference
from llmstack.model import Llama
from tests.helpers import run_cli, tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from llmstack.train import train
    out = tmp_path_factory.mktemp("teacher")
    train(tiny_config(out, **{"train.max_steps": 10, "checkpoint.every_steps": 10}))
    return out


def _pair(tmp_path, kind="forward_kl"):
    cfg = tiny_config(tmp_path, **{"model.n_layers": 1, "distill.loss": kind, "distill.temperature": 3.0,
                                   "distill.alpha": 0.7, "distill.beta": 0.4})
    torch.manual_seed(0)
    student = DistillStudent(cfg.model)
    teacher = Llama(tiny_config(tmp_path, **{"model.dim": 96, "model.n_heads": 4}).model)
    attach_teacher(student, teacher, cfg.distill)
    return cfg, student, teacher


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_student_loss_is_ce_plus_scaled_kd(tmp_path, kind):
    cfg, student, teacher = _pair(tmp_path, kind)
    x = torch.randint(0, 512, (2, 16))
    y = torch.randint(0, 512, (2, 16))
    y[0, :3] = -100
    student.train()
    loss = student(x, y, reduction="sum")
    h = student.hidden_states(x).reshape(-1, 64)
    h_t = teacher.hidden_states(x).reshape(-1, 96)
    ref = kd_loss_reference(h, student.output.weight, y.reshape(-1), h_t=h_t, w_t=teacher.output.weight, kind=kind,
                            temperature=3.0, alpha=0.7, beta=0.4)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    loss.backward()
    assert student.output.weight.grad is not None and student.tok_embeddings.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    mean = student(x, y)  # default "mean" over valid targets
    torch.testing.assert_close(mean, loss.detach() / 29, rtol=1e-5, atol=1e-5)
    student.eval()  # eval: plain CE, comparable with a student trained without KD
    torch.testing.assert_close(student(x, y, reduction="sum"), Llama.forward(student, x, y, reduction="sum"))


def test_teacher_is_not_a_submodule_nor_saved_nor_optimized(tmp_path):
    cfg, student, teacher = _pair(tmp_path)
    names = [n for n, _ in student.named_parameters()]
    assert not any(n.startswith("teacher") for n in names)
    assert not any(k.startswith("teacher") for k in student.state_dict())
    assert "teacher" not in dict(student.named_children())
    assert student.num_params() == Llama(cfg.model).num_params()


def test_tokenizer_and_vocab_checks_are_one_line_errors(tmp_path):
    cfg = tiny_config(tmp_path)
    t_cfg = tiny_config(tmp_path, **{"model.vocab_size": 640})
    with pytest.raises(DistillError, match="vocab size 640 != student model.vocab_size 512") as e:
        check_compatible(cfg, SimpleNamespace(cfg=t_cfg, tokenizer=None, folder=tmp_path))
    assert "\n" not in str(e.value)
    same = tiny_config(tmp_path)
    with pytest.raises(DistillError, match="tokenizer .* differs"):
        check_compatible(cfg, SimpleNamespace(cfg=same, tokenizer=Tokenizer("bytes"), folder=tmp_path))
    with pytest.raises(DistillError, match="no tokenizer"):
        check_compatible(cfg, SimpleNamespace(cfg=same, tokenizer=None, folder=tmp_path))


@pytest.mark.slow
def test_cli_distill_end_to_end(teacher_run, tmp_path):
    out = tmp_path / "student"
    args = tiny_overrides(out, **{"model.n_layers": 1, "train.max_steps": 6, "train.eval_every": 6,
                                  "checkpoint.every_steps": 6, "distill.teacher": str(teacher_run),
                                  "distill.loss": "jsd"})
    r = run_cli("distill", "--config", "configs/recipes/distill.yaml", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    from llmstack.pretrained import load_pretrained
    pre = load_pretrained(out)  # a plain student checkpoint: no teacher tensors inside
    assert pre.model.cfg.n_layers == 1 and pre.kind == "llmstack"
    if summary is not None:
        assert summary["final_val_loss"] > 0
    bad = run_cli("distill", "--config", "configs/recipes/distill.yaml",
                  *tiny_overrides(tmp_path / "bad", **{"distill.teacher": str(tmp_path / "nope")}))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
