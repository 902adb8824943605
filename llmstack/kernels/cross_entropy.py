"""Linear + cross-entropy: loss of (h @ W.T) against targets. This first version materialises
the logits; the chunked version replaces `linear_cross_entropy_torch`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(h, weight, targets, *, ignore_index: int = -100, reduction: str = "sum",
                                   z_loss: float = 0.0, label_smoothing: float = 0.0, softcap: float | None = None,
                                   chunk_size: int = 4096):
    logits = (h @ weight.t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
    if z_loss:
        valid = targets != ignore_index
        loss = loss + z_loss * (torch.logsumexp(logits, dim=-1)[valid] ** 2).sum()
    if reduction == "mean":
        loss = loss / (targets != ignore_index).sum().clamp(min=1)
    return loss


def linear_cross_entropy_torch(h, weight, targets, **kwargs):
    return linear_cross_entropy_reference(h, weight, targets, **kwargs)
