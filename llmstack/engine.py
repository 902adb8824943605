"""What the trainer drives: one global optimizer step from a list of micro-batches.

`LocalEngine` is the single-process engine (plain torch AdamW). The distributed engines in
`llmstack.parallel` implement the same methods, so `train.py` never touches torch.distributed or
DeepSpeed itself.

Loss normalization: every micro-batch returns the *sum* of its token losses and the step divides
by the number of target tokens in the whole global batch (all micro-batches, all data-parallel
ranks). Averaging per-micro-batch means instead would over-weight short or heavily masked
micro-batches, and accum=4 x mb=2 would not equal accum=1 x mb=8.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmstack import jsonio
from llmstack import checkpoint as ckpt
from llmstack.config import Config
from llmstack.data import Batch
from llmstack.prune.masks import MaskKeeper


@dataclass
class StepResult:
    loss: float  # mean loss per target token over the global batch
    grad_norm: float  # before clipping
    n_tokens: int  # target tokens in the global batch
    applied: bool  # False when the update was skipped (non-finite loss or gradient)


def param_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> tuple[list[dict], dict[int, str]]:
    """The AdamW groups of every engine: weight decay on matrices only (norm gains and biases
    decay towards zero otherwise), each trainable parameter once (a tied weight appears under two
    names); and each parameter's name by its index in the groups, the order optimizer state is kept in."""
    seen, decay, no_decay = set(), [], []
    for n, p in params:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append((n, p))
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    return groups, {i: n for i, (n, _) in enumerate(decay + no_decay)}


def build_optimizer(cfg: Config, params: list[tuple[str, torch.nn.Parameter]], device: torch.device):
    """AdamW over `param_groups`; fused kernels where the device has them."""
    groups, names = param_groups(params, cfg.optim.weight_decay)
    kwargs = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    try:
        opt = torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, foreach=True, **kwargs)
    return opt, names


def autocast_for(cfg: Config, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_loss_sum(model, batch: Batch) -> torch.Tensor:
    return model(batch.input, batch.target, position_ids=batch.position_ids, doc_ids=batch.doc_ids, reduction="sum")


class LocalEngine:
    rank, world, dp_rank, dp_world, is_main = 0, 1, 0, 1, True

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device):
        self.cfg, self.model, self.device = cfg, model, device
        self.optimizer, self.param_names = build_optimizer(cfg, list(model.named_parameters()), device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sparsity = MaskKeeper(model.named_parameters(), getattr(model, "sparsity_masks", None))  # prune

    def describe(self) -> str:
        return f"single process on {self.device}"

    def train_step(self, micro_batches: list[Batch], lr: float) -> StepResult:
        self.model.train()
        n_tokens = sum(mb.n_targets for mb in micro_batches)
        denom = max(n_tokens, 1)
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            with autocast_for(self.cfg, self.device):
                loss_sum = forward_loss_sum(self.model, mb)
            (loss_sum.float() / denom).backward()
            total += loss_sum.detach().float()
        max_norm = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        loss, norm = (torch.stack([total / denom, grad_norm.float()])).tolist()  # the step's one host sync
        applied = torch.isfinite(torch.tensor([loss, norm])).all().item()
        if applied:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.sparsity.apply()  # prune: pruned weights stay exactly zero
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, norm, n_tokens, bool(applied))

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for b in batches:
            b = b.to(self.device)
            with autocast_for(self.cfg, self.device):
                total += float(forward_loss_sum(self.model, b))
            count += b.n_targets
        self.model.train()
        return total / max(count, 1)

    def eval_model(self) -> torch.nn.Module:
        return self.model

    # checkpoint pieces (the trainer handles folders, RNG, data position)
    def save(self, folder: Path) -> None:
        ckpt.save_model(self.model, folder)
        tensors, rest = ckpt.optimizer_tensors(self.optimizer, self.param_names)
        save_file(tensors, str(folder / "optimizer.safetensors"))
        (folder / "optimizer.json").write_text(jsonio.dumps(rest))
        self.sparsity.save(folder)  # prune

    def load(self, folder: Path) -> None:
        ckpt.load_model_state(self.model, folder / "model.safetensors")
        tensors = ckpt.load_tensors(folder / "optimizer.safetensors")
        rest = ckpt.read_json(folder / "optimizer.json")
        ckpt.restore_optimizer(self.optimizer, self.param_names, tensors, rest)
        if self.cfg.sparsity.keep_mask:  # prune: resume restores the mask
            self.sparsity.load(folder)

    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def params_finite(self) -> bool:
        return ckpt.first_nonfinite((str(i), p.detach()) for i, p in enumerate(self.params)) is None

    def barrier(self) -> None:
        pass

    def all_reduce_max(self, value: float) -> float:
        return value

    def close(self) -> None:
        pass
