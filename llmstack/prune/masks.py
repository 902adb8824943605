"""Sparsity masks: the file a pruned checkpoint carries, and keeping it through training.

A pruned checkpoint (`llmstack prune`) and every checkpoint of a run that keeps its mask hold
`sparsity_mask.safetensors`: one bool tensor per pruned parameter (True = kept), named as in
`Llama.named_parameters()`. The weights themselves are ordinary dense tensors with zeros, so
every tool that reads a checkpoint reads a pruned one.

Recovery fine-tuning (`sparsity.keep_mask`, on by default): when `init_from` holds a mask,
`attach_init_masks` puts it on the model, and the engine's `MaskKeeper`
- zeroes the gradient of every pruned weight as autograd produces it (a hook on the parameter),
  so clipping norms and optimizer moments never see it, and
- multiplies the weights by the mask again after every optimizer step (and, through `master`,
  the fp32 master copies a ZeRO optimizer keeps: see llmstack/parallel/sparsity.py), so no
  optimizer, weight decay or stale moment can bring a pruned weight back.
Under tensor parallelism each rank keeps its shard of the mask (`shard`); a pipeline stage binds
the masks of its own parameters. The keeper saves the full mask with every checkpoint and
`load` restores it on resume. LoRA wraps a projection as `<name>.base_layer`: the frozen base
keeps its mask (the adapters are dense, so a *merged* LoRA model is not sparse).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from llmstack import checkpoint as ckpt

log = logging.getLogger("llmstack")
MASK_FILE = "sparsity_mask.safetensors"


def write_masks(masks: dict[str, torch.Tensor], folder: Path) -> None:
    tensors = {k: v.detach().to(torch.bool).cpu().contiguous() for k, v in sorted(masks.items())}
    save_file(tensors, str(Path(folder) / MASK_FILE), metadata={"format": "llmstack-sparsity-mask"})


def read_masks(folder: Path) -> dict[str, torch.Tensor] | None:
    """The masks stored in a checkpoint folder, or None when it has none."""
    path = Path(folder) / MASK_FILE
    if not path.exists():
        return None
    masks = ckpt.load_tensors(path)
    for k, v in masks.items():
        if v.dtype != torch.bool:
            raise ckpt.CheckpointError(f"{path}: mask {k} has dtype {v.dtype}, expected bool")
    return masks


def check_masks(masks: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """Every mask names a parameter of `model` (plain llmstack names) with the same shape."""
    own = dict(model.named_parameters())
    for k, v in masks.items():
        if k not in own:
            raise ckpt.CheckpointError(f"{where}: mask for {k}, which is not a parameter of this model")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ckpt.CheckpointError(f"{where}: mask {k} has shape {tuple(v.shape)}, the parameter has "
                                       f"{tuple(own[k].shape)}")


def masks_of_init(spec: str | None) -> tuple[dict[str, torch.Tensor] | None, Path | None]:
    """(masks, folder) of an `init_from` value: an llmstack checkpoint or run folder with a mask."""
    if not spec or spec.startswith("hf:"):
        return None, None
    p = Path(spec)
    folder = p if (p / MASK_FILE).exists() else ckpt.latest_checkpoint(p)
    if folder is None or not (folder / MASK_FILE).exists():
        return None, None
    return read_masks(folder), folder


@torch.no_grad()
def attach_init_masks(model: torch.nn.Module, cfg, *, source) -> None:
    """After `init_from` is loaded from `source` (the folder itself, or a PEFT adapter's base): put
    its mask (if any, and cfg.sparsity.keep_mask) on the model as `model.sparsity_masks` and zero
    the pruned weights; the engine keeps them zero."""
    if not cfg.sparsity.keep_mask:
        return
    masks, folder = masks_of_init(source)
    if masks is None:
        return
    check_masks(masks, model, str(folder / MASK_FILE))
    params = dict(model.named_parameters())
    for k, m in masks.items():
        params[k].mul_(m)
    model.sparsity_masks = masks
    pruned = sum(int((~m).sum()) for m in masks.values())
    log.info("keeping the sparsity mask of %s: %d tensors, %s weights pruned", folder, len(masks), f"{pruned:,}")


def _plain_name(name: str) -> str:
    return name.replace(".base_layer.", ".")  # a LoRA-wrapped projection's frozen base


def _masked_grad(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * mask


class MaskKeeper:
    """Keeps the masked weights of one engine's parameters at exactly zero (see the module doc).

    `named_params`: (name, parameter) of what this process trains; `all_names`: every parameter
    name of the model (a pipeline stage trains only some). `shard(name, full_mask)` gives this
    rank's part of a mask (tensor parallelism). `master(param, local_mask)` also masks an
    optimizer's own copy of the weights after each step."""

    def __init__(self, named_params, masks: dict[str, torch.Tensor] | None = None, *, all_names=None,
                 shard: Callable | None = None, master: Callable | None = None):
        self.params = {_plain_name(n): p for n, p in named_params}
        self.all_names = {_plain_name(n) for n in all_names} if all_names is not None else set(self.params)
        self.shard, self.master = shard, master
        self.masks: dict[str, torch.Tensor] = {}
        self._bound: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._hooks: list = []
        self.set(masks)

    def set(self, masks: dict[str, torch.Tensor] | None) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._bound = [], []
        self.masks = dict(masks or {})
        unknown = sorted(set(self.masks) - self.all_names)
        if unknown:
            raise ckpt.CheckpointError(f"sparsity mask for {unknown[0]}, which is not a parameter of this model")
        for name, full in self.masks.items():
            p = self.params.get(name)
            if p is None:  # another pipeline stage's parameter
                continue
            local = (self.shard(name, full) if self.shard else full).to(p.device)
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the shape aside
            if tuple(local.shape) != shape:
                raise ckpt.CheckpointError(f"sparsity mask {name}: shape {tuple(local.shape)}, the parameter here "
                                           f"has {shape}")
            if p.requires_grad:
                self._hooks.append(p.register_hook(functools.partial(_masked_grad, local)))
            self._bound.append((p, local))
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights (after an optimizer step)."""
        for p, m in self._bound:
            if p.numel() == m.numel():  # not a ZeRO-3 partition (size 0 outside forward)
                p.mul_(m)
            if self.master is not None:
                self.master(p, m)

    def save(self, folder: Path) -> None:
        if self.masks:
            write_masks(self.masks, folder)

    def load(self, folder: Path) -> None:
        """Resume: the checkpoint's mask replaces the current one (a checkpoint without one keeps it)."""
        masks = read_masks(folder)
        if masks is not None:
            self.set(masks)

    def __len__(self) -> int:
        return len(self._bound)
