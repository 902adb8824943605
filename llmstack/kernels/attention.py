"""Causal grouped-query attention. q: [B, T, H, D], k/v: [B, T, Hkv, D] -> [B, T, H, D].
doc_ids: optional [B, T] ints; a query attends only to keys of the same document (packing)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_reference(q, k, v, *, causal: bool = True, scale: float | None = None, doc_ids=None):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    qh = q.transpose(1, 2).float()
    kh = k.transpose(1, 2).float().repeat_interleave(H // Hkv, dim=1)
    vh = v.transpose(1, 2).float().repeat_interleave(H // Hkv, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    allowed = torch.ones(T, k.shape[1], dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vh
    return out.transpose(1, 2).to(q.dtype)


def attention_torch(q, k, v, *, causal: bool = True, scale: float | None = None, doc_ids=None):
    """SDPA with GQA (enable_gqa avoids materialising repeated K/V)."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = kh.shape[1] != qh.shape[1]
    if doc_ids is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=gqa)
    else:
        T = q.shape[1]
        mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        if causal:
            mask = mask & torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)
