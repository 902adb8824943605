"""A Llama-style decoder in plain torch.

Token embedding -> n_layers x [RMSNorm -> grouped-query attention with rotary embeddings ->
residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head.

The hot ops (norm, rope, attention, SwiGLU, the fused linear + cross-entropy) are called through
`self.ops`, a table chosen once by `llmstack.kernels.resolve_ops`. Nothing in this file knows
about parallelism: tensor/pipeline parallelism replace modules from outside (llmstack/parallel).
Attention and MLP read their local head counts from attributes so a sharded copy just changes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmstack.config import ModelConfig
from llmstack.kernels import KernelOps, torch_ops


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim/2] in fp32, with optional Llama-3 frequency scaling."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd))
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: KernelOps, residual: torch.Tensor | None = None):
        """rms_norm(x); with `residual`: (rms_norm(x + residual), x + residual) in one fused op."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.rms_norm_residual(x, residual, self.weight, self.eps)


@dataclass
class CacheIndex:
    """Where a cached forward reads and writes the KV cache when rows sit at different columns
    (continuous batching): input row b is cache row `rows[b]` and writes its T new keys/values
    at columns cols[b] .. cols[b] + T - 1 (cols [B]) or at cols[b, t] (cols [B, T]: padding can
    point anywhere harmless); attention then spans columns 0 .. span - 1 of those rows (the
    mask's last dim). `rows` is a slice (a view: no copy) or a LongTensor [B] (read through a
    gather). Keeping cols on the device lets a CUDA graph replay with new columns."""
    rows: slice | torch.Tensor
    cols: torch.Tensor  # [B] or [B, T], int64
    span: int


class KVCache(nn.Module):
    """Static pre-allocated keys/values for one layer: [B, max_len, Hkv, D]."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | CacheIndex, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(start, CacheIndex):
            return self._update_rows(start, k, v)
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]

    def _update_rows(self, at: CacheIndex, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[1]
        rows = at.rows if isinstance(at.rows, torch.Tensor) else torch.arange(at.rows.start or 0, at.rows.stop,
                                                                                 device=k.device)
        cols = at.cols if at.cols.dim() == 2 else at.cols[:, None] + torch.arange(T, device=k.device)
        self.k[rows[:, None], cols] = k.to(self.k.dtype)
        self.v[rows[:, None], cols] = v.to(self.v.dtype)
        return self.k[at.rows, :at.span], self.v[at.rows, :at.span]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x, rope, ops: KernelOps, position_ids=None, doc_ids=None, cache_start=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = ops.rope(q, k, rope[0], rope[1], position_ids)
        if cache_start is None:
            y = ops.attention(q, k, v, causal=True, doc_ids=doc_ids)
        else:
            # Decoding: attend over everything cached so far under an explicit mask
            # (left padding of batched prompts makes the mask per row).
            k, v = self.cache.update(cache_start, k, v)
            qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask,
                                               enable_gqa=kh.shape[1] != qh.shape[1]).transpose(1, 2)
        return self.wo(y.reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x, ops: KernelOps):
        if type(self.w1) is nn.Linear and type(self.w3) is nn.Linear:
            # Plain weights: one fused gate-up matmul. Wrapped layers (LoRA, tensor-parallel)
            # keep their own forward, so they go through the unfused path.
            h = ops.gate_up_swiglu(x, self.w1.weight, self.w3.weight)
        else:
            h = ops.swiglu(self.w1(x), self.w3(x))
        return self.w2(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, *, rope, ops, position_ids=None, doc_ids=None, cache_start=None, attn_mask=None):
        # keyword-only: calibration (GPTQ, SparseGPT) and the pipeline stages call blocks directly, and
        # position_ids/doc_ids/cache_start would silently swap if passed by position
        a = self.attention(self.attention_norm(x, ops), rope, ops, position_ids=position_ids, doc_ids=doc_ids,
                           cache_start=cache_start, attn_mask=attn_mask)
        if type(self.ffn_norm) is RMSNorm:  # one fused pass: x + a and its norm (wrapped norms: two ops)
            h, x = self.ffn_norm(x, ops, residual=a)
        else:
            x = x + a
            h = self.ffn_norm(x, ops)
        return x + self.feed_forward(h, ops)


class LMHead(nn.Module):
    """Projects hidden states to the vocabulary; the loss never builds all logits at once."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.t()

    def loss(self, h, targets, ops: KernelOps, reduction: str = "mean", chunk_size: int = 0):
        """chunk_size 0: tokens per chunk sized by the loss driver's memory budget (kernels/chunked_loss.py)."""
        return ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.weight, targets.reshape(-1),
                                        ignore_index=-100, reduction=reduction, chunk_size=chunk_size)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps | None = None):
        super().__init__()
        self.cfg = cfg
        self.ops = ops or torch_ops()
        self.loss_chunk_size = 0  # 0 = sized by the loss driver's memory budget
        self.activation_checkpointing = False
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = LMHead(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                # residual-branch outputs scaled down so the residual stream keeps unit scale with depth
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def hidden_states(self, tokens, position_ids=None, doc_ids=None, cache_start=None, attn_mask=None):
        x = self.tok_embeddings(tokens)
        rope = (self.rope_cos, self.rope_sin)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and cache_start is None:
                x = checkpoint(layer, x, rope=rope, ops=self.ops, position_ids=position_ids, doc_ids=doc_ids,
                               use_reentrant=False)
            else:
                x = layer(x, rope=rope, ops=self.ops, position_ids=position_ids, doc_ids=doc_ids,
                          cache_start=cache_start, attn_mask=attn_mask)
        return self.norm(x, self.ops)

    def forward(self, tokens, targets=None, *, position_ids=None, doc_ids=None, reduction: str = "mean"):
        """Logits [B, T, V] without targets; with targets (-100 = ignored) the loss, never the logits."""
        h = self.hidden_states(tokens, position_ids, doc_ids)
        if targets is None:
            return self.output(h).float()
        return self.output.loss(h, targets, self.ops, reduction=reduction, chunk_size=self.loss_chunk_size)

    # --- inference with a static KV cache -----------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, dtype=None) -> None:
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(batch, max_len, attn.wk.out_features // attn.head_dim, attn.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    def forward_cached(self, tokens, cache_start: int | CacheIndex, position_ids, attn_mask):
        """Logits of `tokens` written into the cache at columns cache_start.. (mask: [B, 1, T, S]);
        a CacheIndex gives each row its own cache row and columns."""
        return self.output(self.hidden_states(tokens, position_ids, None, cache_start, attn_mask)).float()

    # --- accounting --------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (matmul params) + 12 * layers * dim * seq_len (PaLM, appendix B).
        The input embedding is a lookup, not a matmul, so it is left out unless tied to the head."""
        n = self.num_params()
        if not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.dim * seq_len
