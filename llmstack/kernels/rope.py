"""Rotary position embedding on q and k together (half-split "rotate_half" convention, as in
Hugging Face Llama, so checkpoints convert without permuting q/k rows).

q: [B, T, H, D], k: [B, T, Hkv, D]; cos/sin tables: [max_pos, D/2] in fp32;
position_ids: [B, T] (packed sequences restart positions per document) or None for 0..T-1.
"""
from __future__ import annotations

import torch


def _gather(table: torch.Tensor, position_ids: torch.Tensor | None, T: int) -> torch.Tensor:
    if position_ids is None:
        return table[:T][None, :, None, :]  # [1, T, 1, D/2]
    return table[position_ids][:, :, None, :]  # [B, T, 1, D/2]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_reference(q, k, cos, sin, position_ids=None):
    c, s = _gather(cos, position_ids, q.shape[1]), _gather(sin, position_ids, q.shape[1])
    return _rotate(q, c, s), _rotate(k, c, s)


def rope_torch(q, k, cos, sin, position_ids=None):
    return rope_reference(q, k, cos, sin, position_ids)
