"""Sparsity masks under the DeepSpeed engine (the mask keeping itself is `llmstack/prune/masks.py`).

- Tensor parallelism: each rank keeps the slice of a mask that matches its weight shard, cut
  exactly as `tensor_parallel` cuts the weights.
- ZeRO: the optimizer steps on its own fp32 master copy and then copies it into the model's
  parameters, so a mask applied to the parameters alone would be overwritten by a master weight
  that drifted. After each step the keeper also masks this rank's piece of the master copy:
  ZeRO-1/2 own a contiguous fragment of each flattened parameter (`_hp_mapping`), ZeRO-3 a
  partition of it (`ds_tensor`, the fp32 copy through DeepSpeed's local-parameter API). Both are
  local operations: no collective per step.
"""
from __future__ import annotations

import torch

from llmstack.parallel.tensor_parallel import split_dim
from llmstack.prune.masks import MaskKeeper


def tp_mask_shard(rank: int, size: int):
    def shard(name: str, mask: torch.Tensor) -> torch.Tensor:
        dim = split_dim(name)
        return mask if size == 1 or dim is None else mask.chunk(size, dim=dim)[rank].contiguous()
    return shard


@torch.no_grad()
def mask_master_weights(p: torch.nn.Parameter, mask: torch.Tensor) -> None:
    if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flattened parameter (last one padded)
        # deepspeed: slow to import, only distributed layouts need it
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param
        part = p.ds_tensor.numel()
        flat = mask.flatten()
        lo = min(p.ds_zero_partition_rank * part, flat.numel())
        local = torch.ones(part, dtype=torch.bool, device=mask.device)
        local[: min(part, flat.numel() - lo)] = flat[lo: lo + part]
        p.ds_tensor.mul_(local.to(p.ds_tensor.device))
        master = safe_get_local_fp32_param(p)
        if master is not None:
            safe_set_local_fp32_param(p, master * local.to(master.device).view_as(master))
    elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2: the fp32 fragment this rank owns
        addr = p._hp_mapping.lp_fragment_address
        frag = p._hp_mapping.get_hp_fragment()
        frag.mul_(mask.flatten().narrow(0, addr.start, addr.numel).to(frag.device).view_as(frag))


def deepspeed_mask_keeper(model: torch.nn.Module, local_params, topo) -> MaskKeeper:
    """The keeper of this rank's parameters (its tensor-parallel shard, its pipeline stage)."""
    return MaskKeeper(local_params, getattr(model, "sparsity_masks", None),
                      all_names=[n for n, _ in model.named_parameters()],
                      shard=tp_mask_shard(topo.tp_rank, topo.tp), master=mask_master_weights)
