"""Knowledge distillation: `llmstack distill --config configs/recipes/distill.yaml [overrides]`.

The student is any llmstack model config, trained by the ordinary loop (`train.train`) with
`model_class=DistillStudent`. The teacher (`distill.teacher`: an llmstack checkpoint or run
folder, an HF folder, anything `load_pretrained` reads) is frozen, in eval mode, without
gradients, in bf16 on GPUs that have it (fp32 on CPU). It is stored on the student with
`object.__setattr__`, so it is not a registered submodule: not in the student's state dict, not
in its checkpoints, not in the optimizer.

Training loss per valid token (the fused kernel `kernels/kd_loss.py` never builds full logits):
    (1 - alpha) * CE(student, label) + alpha * T^2 * D(teacher || student at temperature T)
with D = forward KL, reverse KL or generalized JSD(beta). T^2 keeps the KD gradient's scale
independent of T (Hinton et al.). In eval mode the student returns its plain CE, so val loss and
perplexity are comparable with a student trained without distillation.
"""
from __future__ import annotations

import logging

import torch

from llmstack.data import Tokenizer, build_corpus, corpus_dir
from llmstack.errors import UserError
from llmstack.model import Llama
from llmstack.pretrained import load_pretrained
from llmstack.train import train

log = logging.getLogger("llmstack")


class DistillError(UserError):
    pass


class DistillStudent(Llama):
    """A Llama whose training forward returns the fused CE + KD loss against `self.teacher`."""

    teacher = None  # set with attach_teacher (object.__setattr__: not a submodule)
    distill_cfg = None

    def forward(self, tokens, targets=None, *, position_ids=None, doc_ids=None, reduction: str = "mean"):
        if targets is None or self.teacher is None or not self.training:
            return super().forward(tokens, targets, position_ids=position_ids, doc_ids=doc_ids, reduction=reduction)
        h = self.hidden_states(tokens, position_ids, doc_ids)
        with torch.no_grad():
            h_t = self.teacher.hidden_states(tokens, position_ids, doc_ids)
        d = self.distill_cfg
        flat = targets.reshape(-1)
        loss = self.ops.kd_loss(h.reshape(-1, h.shape[-1]), self.output.weight, flat,
                                h_t=h_t.reshape(-1, h_t.shape[-1]), w_t=self.teacher.output.weight, kind=d.loss,
                                temperature=d.temperature, alpha=d.alpha, beta=d.beta, chunk_size=self.loss_chunk_size)
        if reduction == "mean":
            loss = loss / (flat != -100).sum().clamp(min=1)
        return loss


def attach_teacher(student: Llama, teacher: Llama, distill_cfg) -> None:
    teacher.eval()
    teacher.requires_grad_(False)
    object.__setattr__(student, "teacher", teacher)
    object.__setattr__(student, "distill_cfg", distill_cfg)


def _vocab_of(tok) -> dict | None:
    if tok is None:
        return None
    if tok.kind == "bytes":
        return {"<bytes>": 257}
    return dict(tok._tok.get_vocab())


def check_compatible(cfg, teacher_pre) -> None:
    """Teacher and student must share the tokenizer: same vocab size and same token table."""
    t_cfg = teacher_pre.cfg.model
    if t_cfg.vocab_size != cfg.model.vocab_size:
        raise DistillError(f"distill.teacher: vocab size {t_cfg.vocab_size} != student model.vocab_size "
                           f"{cfg.model.vocab_size}; teacher and student must share the tokenizer")
    if t_cfg.max_seq_len < cfg.data.seq_len:
        raise DistillError(f"distill.teacher: context {t_cfg.max_seq_len} < data.seq_len {cfg.data.seq_len}")
    if cfg.data.source == "stdlib":
        build_corpus(cfg)
        student_tok = Tokenizer.load(corpus_dir(cfg.data, cfg.model.vocab_size))
    else:
        student_tok = Tokenizer("hf", cfg.data.tokenizer_path) if cfg.data.tokenizer == "hf" else None
    if teacher_pre.tokenizer is None:
        raise DistillError(f"distill.teacher: {teacher_pre.folder} has no tokenizer files to check against the "
                           f"student's data")
    if student_tok is not None and _vocab_of(student_tok) != _vocab_of(teacher_pre.tokenizer):
        raise DistillError(f"distill.teacher: the tokenizer in {teacher_pre.folder} differs from the student's data "
                           f"tokenizer ({student_tok.kind}, same size {cfg.model.vocab_size} but different tokens); "
                           f"distill on the teacher's corpus")


def load_teacher(cfg):
    """The teacher on CPU, checked against the student config (before any run folder exists)."""
    if not cfg.distill.teacher:
        raise DistillError("distill.teacher: not set; give a checkpoint, run or HF folder (distill.teacher=PATH)")
    pre = load_pretrained(cfg.distill.teacher, device="cpu")
    check_compatible(cfg, pre)
    return pre


def teacher_on(teacher: Llama, device: torch.device) -> Llama:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        teacher = teacher.to(torch.bfloat16)
    return teacher.to(device)


def distill(cfg) -> dict:
    pre = load_teacher(cfg)

    def prepare(model, device):
        teacher = teacher_on(pre.model, device)
        attach_teacher(model, teacher, cfg.distill)
        log.info("distill: teacher %s (%s params, frozen), loss %s, T=%g, alpha=%g%s", pre.folder,
                 f"{teacher.num_params():,}", cfg.distill.loss, cfg.distill.temperature, cfg.distill.alpha,
                 f", beta={cfg.distill.beta}" if cfg.distill.loss == "jsd" else "")

    summary = train(cfg, model_class=DistillStudent, prepare_model=prepare)
    summary["teacher"] = str(pre.folder)
    return summary
