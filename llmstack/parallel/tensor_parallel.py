"""Tensor parallelism applied from outside the model (Megatron-LM's layout).

`apply_tensor_parallel(model, group)` replaces modules of an already-initialised `Llama` in place:
column-parallel wq/wk/wv and w1/w3 (output features split), row-parallel wo and w2 (input features
split, outputs all-reduced), a vocab-parallel embedding and a vocab-parallel LM head whose loss
never builds full-vocabulary logits on one rank. Every shard is *sliced* from the full weights, so
a tensor-parallel run starts from exactly the weights of the single-process run.

Each collective is an autograd.Function with the matching backward:
  copy   (fwd identity,   bwd all-reduce)  in front of column-parallel layers
  reduce (fwd all-reduce, bwd identity)    after row-parallel layers / the vocab-parallel lookup
Replicated parameters (norms) therefore see the full gradient on every rank. Sharded parameters
are marked `model_parallel = True` so DeepSpeed counts them once per rank in the gradient norm.

Sequence parallelism (Megatron-LM, Korthikanti et al. 2022) additionally splits the residual
stream, the norms and the embedding output along the sequence: each rank holds [B, T/tp, D]
between sublayers. The copy/reduce pair becomes
  gather  (fwd all-gather along T, bwd reduce-scatter)  once in front of attention and the MLP
  scatter (fwd reduce-scatter along T, bwd all-gather)  after row-parallel layers / the lookup
so the communicated volume is unchanged while norm/residual activations shrink by tp. A norm
weight then sees only its rank's tokens, so its gradient is summed over the tensor-parallel ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llmstack.kernels.chunked_loss import apply_chunked_loss, check_targets, chunked_linear_loss
from llmstack.kernels.cross_entropy import softmax_grad_torch
from llmstack.parallel.plan import LayoutError, check_tp_split


# --- collectives with autograd ---------------------------------------------------------------

class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSequence(torch.autograd.Function):
    """[B, T/tp, ...] -> [B, T, ...]; the gradient is summed over ranks and split back."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_sequence(g, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    """Partial sums [B, T, ...] -> this rank's summed slice [B, T/tp, ...]."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_sequence(g, ctx.group), None


def _all_gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if x.shape[1] % size:
        raise ValueError(f"sequence parallel: sequence length {x.shape[1]} is not divisible by tp={size}")
    out = torch.empty_like(x.narrow(1, 0, x.shape[1] // size), memory_format=torch.contiguous_format)
    dist.reduce_scatter(out, [c.contiguous() for c in x.chunk(size, dim=1)], group=group)
    return out


def copy_to_tp(x, group):
    return _Copy.apply(x, group)


def reduce_from_tp(x, group):
    return _Reduce.apply(x, group)


def gather_sequence(x, group):
    return _GatherSequence.apply(x, group)


def scatter_sequence(x, group):
    return _ScatterSequence.apply(x, group)


def _mark(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.model_parallel = True
    p.tensor_model_parallel = True
    p.partition_dim = dim
    return p


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return t.detach().chunk(size, dim=dim)[rank].clone().contiguous()


# --- layers ----------------------------------------------------------------------------------

class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T: this rank's slice of the output features."""

    def __init__(self, full: nn.Linear, group, rank: int, size: int, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = full.in_features, full.out_features // size
        self.weight = _mark(nn.Parameter(_shard(full.weight, 0, rank, size)), 0)
        self.bias = _mark(nn.Parameter(_shard(full.bias, 0, rank, size)), 0) if full.bias is not None else None

    def forward(self, x):
        # under sequence parallelism the sublayer's input was gathered (its backward sums the grads)
        return F.linear(x if self.sequence_parallel else copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T (all-reduce); input features are split."""

    def __init__(self, full: nn.Linear, group, rank: int, size: int, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = full.in_features // size, full.out_features
        self.weight = _mark(nn.Parameter(_shard(full.weight, 1, rank, size)), 1)
        if full.bias is not None:
            raise LayoutError("tensor parallel: row-parallel layers with a bias are not supported")
        self.bias = None

    def forward(self, x):
        y = F.linear(x, self.weight)
        return scatter_sequence(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)


class VocabParallelEmbedding(nn.Module):
    """Rows [rank*V/tp, (rank+1)*V/tp) of the table; other tokens look up zeros, then all-reduce."""

    def __init__(self, full: nn.Embedding, group, rank: int, size: int, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim
        self.vocab_start = rank * full.num_embeddings // size
        self.vocab_end = (rank + 1) * full.num_embeddings // size
        self.weight = _mark(nn.Parameter(_shard(full.weight, 0, rank, size)), 0)

    def forward(self, tokens):
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return scatter_sequence(x, self.group) if self.sequence_parallel else reduce_from_tp(x, self.group)


def vocab_parallel_cross_entropy(h, weight, targets, *, vocab_start: int, vocab_total: int, group, chunk_size: int,
                                 ignore_index: int, sum_dh: bool):
    """Sum of token cross-entropies with the vocabulary split over ranks: the shared chunk driver
    (llmstack/kernels/chunked_loss.py) over this rank's rows of W, with the torch CE step whose
    per-row max and sum-exp are combined over the ranks (one MAX and one SUM all-reduce per chunk).
    Gradients are computed in the forward, as in the single-device loss: dh is summed over ranks
    here in fp32 (or by the sequence gather's reduce-scatter under sequence parallelism:
    `sum_dh=False`), dW stays local (fp32 accumulation)."""
    check_targets(targets, vocab_total, ignore_index, "vocab-parallel cross-entropy")
    targets = targets.contiguous()
    scale = torch.ones((), dtype=torch.float32, device=h.device)

    def step(logits, lo, hi):
        return softmax_grad_torch(logits, targets[lo:hi], scale, ignore_index=ignore_index, vocab_start=vocab_start,
                                  vocab_total=vocab_total,
                                  reduce_max=lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group),
                                  reduce_sum=lambda t: dist.all_reduce(t, group=group))

    def run(need_grad_h, need_grad_w):
        loss, dh, dw = chunked_linear_loss(h, weight, step, chunk_tokens=chunk_size, need_grad_h=need_grad_h,
                                           need_grad_w=need_grad_w, grad_h_dtype=torch.float32)
        if dh is not None and sum_dh:
            dist.all_reduce(dh, group=group)
        return loss, dh, dw

    return apply_chunked_loss(h, weight, run)


class VocabParallelLMHead(nn.Module):
    """The LM head with its vocabulary rows split over tensor-parallel ranks."""

    def __init__(self, full: nn.Module, group, rank: int, size: int, weight: nn.Parameter | None = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.size, self.sequence_parallel = group, size, sequence_parallel
        vocab = full.weight.shape[0]
        self.vocab_start = rank * vocab // size
        self.weight = weight if weight is not None else _mark(nn.Parameter(_shard(full.weight, 0, rank, size)), 0)

    def forward(self, h):
        """Full logits (inference only): local logits gathered over ranks."""
        if self.sequence_parallel:
            h = gather_sequence(h, self.group)
        local = h @ self.weight.t()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def loss(self, h, targets, ops=None, reduction: str = "mean", chunk_size: int = 0):
        """chunk_size 0: sized by the loss driver's memory budget for this rank's [chunk, V/tp] logits."""
        if self.sequence_parallel:
            h = gather_sequence(h, self.group)
        h2 = h.reshape(-1, h.shape[-1])
        t = targets.reshape(-1)
        loss = vocab_parallel_cross_entropy(h2, self.weight, t, vocab_start=self.vocab_start,
                                            vocab_total=self.weight.shape[0] * self.size, group=self.group,
                                            chunk_size=chunk_size, ignore_index=-100,
                                            sum_dh=not self.sequence_parallel)
        if reduction == "mean":
            loss = loss / (t != -100).sum().clamp(min=1)
        return loss


# --- applying it -----------------------------------------------------------------------------

class SequenceParallelRMSNorm(nn.Module):
    """RMSNorm over this rank's slice of the sequence; the weight's gradient is summed over ranks."""

    def __init__(self, norm: nn.Module, group):
        super().__init__()
        self.eps, self.weight, self.group = norm.eps, norm.weight, group

    def forward(self, x, ops):
        return ops.rms_norm(x, copy_to_tp(self.weight, self.group), self.eps)


def _gather_first_input(group):
    def hook(module, args):
        return (gather_sequence(args[0], group),) + tuple(args[1:])
    return hook


@torch.no_grad()
def apply_tensor_parallel(model: nn.Module, group, rank: int, size: int, sequence_parallel: bool = False) -> nn.Module:
    """Shard `model` (a full, initialised Llama) in place for tensor-parallel rank `rank` of `size`.
    With `sequence_parallel`, activations between sublayers are split along the sequence too."""
    if size == 1:
        return model
    check_tp_split(model.cfg, size)
    sp = sequence_parallel
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        for name in ("wq", "wk", "wv"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), group, rank, size, sp))
        attn.wo = RowParallelLinear(attn.wo, group, rank, size, sp)
        attn.n_heads //= size
        attn.n_kv_heads //= size
        ffn.w1 = ColumnParallelLinear(ffn.w1, group, rank, size, sp)
        ffn.w3 = ColumnParallelLinear(ffn.w3, group, rank, size, sp)
        ffn.w2 = RowParallelLinear(ffn.w2, group, rank, size, sp)
        if sp:
            # one gather per sublayer (not one per projection); names of parameters are unchanged
            attn.register_forward_pre_hook(_gather_first_input(group))
            ffn.register_forward_pre_hook(_gather_first_input(group))
            block.attention_norm = SequenceParallelRMSNorm(block.attention_norm, group)
            block.ffn_norm = SequenceParallelRMSNorm(block.ffn_norm, group)
    if sp:
        model.norm = SequenceParallelRMSNorm(model.norm, group)
    tied = model.cfg.tie_embeddings
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, group, rank, size, sp)
    model.output = VocabParallelLMHead(model.output, group, rank, size,
                                       weight=model.tok_embeddings.weight if tied else None, sequence_parallel=sp)
    model.tp_size, model.tp_rank, model.sequence_parallel = size, rank, sp
    return model


# --- undoing it (checkpoints) ----------------------------------------------------------------

def split_dim(name: str) -> int | None:
    """Which dim of a plain-Llama tensor is split over tensor-parallel ranks (None: replicated)."""
    if name.endswith(("wq.weight", "wk.weight", "wv.weight", "wq.bias", "wk.bias", "wv.bias",
                      "w1.weight", "w3.weight")) or name in ("tok_embeddings.weight", "output.weight"):
        return 0
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    return None


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full tensors from per-tensor-parallel-rank state dicts (in rank order)."""
    out = {}
    for name in shards[0]:
        dim = split_dim(name)
        out[name] = shards[0][name] if dim is None or len(shards) == 1 else torch.cat([s[name] for s in shards], dim=dim)
    return out
