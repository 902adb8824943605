"""Fused linear + cross-entropy: loss of (h @ W.T) against targets without ever holding the
[N, V] logits.

Three implementations with one signature
``fn(h, weight, targets, *, ignore_index=-100, reduction="sum"|"mean", z_loss=0.0,
label_smoothing=0.0, softcap=None, chunk_size=0)`` -> fp32 scalar:

- `linear_cross_entropy_reference`: naive, materialises the logits (tests and benchmarks only).
- `linear_cross_entropy_torch`: the shared chunk driver (`chunked_loss.py`: chunk logits in the
  GEMM dtype, dlogits written over them, grad_h and fp32 grad_W accumulated in place) with the
  per-chunk step `softmax_grad_torch` in plain torch. This is the CPU path.
- `linear_cross_entropy_triton`: same driver; the per-chunk step is the Triton kernel
  `_ce_chunk_kernel` (one program per row, two passes over V in blocks: an online max / sum-exp
  pass, then a pass that overwrites the logits with dlogits in place, in the logits' own dtype).
  The three GEMMs per chunk are torch (cuBLAS on GPU).

`chunk_size=0` sizes chunks by the driver's memory budget (`loss_chunk_tokens`).

Semantics equal the reference exactly: softcap s maps logits z -> s * tanh(z / s) before the
softmax; label smoothing eps is torch's (loss = (1 - eps) * nll + eps * (lse - mean_j z_j));
z_loss adds z_loss * lse^2 per valid token; ignored tokens contribute nothing; "mean" divides by
the number of non-ignored targets (at least 1). A target outside [0, V) that is not ignore_index
raises `TargetOutOfRange`.

Precision: with bf16/fp16 inputs (or under autocast) the logits are the GEMM's output in that
dtype, as in an unfused model; the softmax, loss and dlogits are computed in fp32 from them and
dlogits are stored back in that dtype (the dtype the next GEMMs read anyway). grad_W is summed
across chunks in fp32 and returned in the weight's dtype, grad_h in h's dtype. The 1/n_valid
scale of "mean" stays a device tensor (no host sync besides the target check).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmstack.kernels import triton_interpreting
from llmstack.kernels.chunked_loss import apply_chunked_loss, check_targets, chunked_linear_loss, row_blocks

_REDUCTIONS = ("sum", "mean")


def linear_cross_entropy_reference(h, weight, targets, *, ignore_index: int = -100, reduction: str = "sum",
                                   z_loss: float = 0.0, label_smoothing: float = 0.0, softcap: float | None = None,
                                   chunk_size: int = 0):
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


def _check_args(h, weight, targets, reduction, chunk_size):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h [N, D] and weight [V, D] expected, got {tuple(h.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets [N] expected, got {tuple(targets.shape)} for N={h.shape[0]}")
    if chunk_size < 0:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 0 (0 = sized by memory budget), got {chunk_size}")


# ---------------------------------------------------------------------------------------------
# per-chunk step, plain torch (also the vocabulary-parallel loss's step)
# ---------------------------------------------------------------------------------------------

def _capped(x, softcap):
    """(z, t): z = softcap * tanh(x / softcap) and t = tanh(x / softcap), or (x, None)."""
    if not softcap:
        return x, None
    t = torch.tanh(x / softcap)
    return t * softcap, t


def softmax_grad_torch(logits, tgt, scale, *, ignore_index, z_loss=0.0, label_smoothing=0.0, softcap=None,
                       vocab_start=0, vocab_total=0, reduce_max=None, reduce_sum=None):
    """Per-chunk cross-entropy step in plain torch: returns the chunk's summed loss (unscaled,
    fp32 0-d) and overwrites `logits` [c, V] (any float dtype) with dlogits times `scale`, zero on
    ignored rows. The math is fp32, in blocks of rows (bounded temporaries).

    Vocabulary-parallel use: `logits` holds columns [vocab_start, vocab_start + V) of a
    `vocab_total`-wide vocabulary; `reduce_max` / `reduce_sum` all-reduce a tensor in place over
    the ranks that hold the other columns. Each rank's per-row max and sum-exp (taken against its
    own max) are combined by one MAX and one SUM reduction, so the logits are read in two passes
    whatever the number of ranks."""
    c, V = logits.shape
    dev = logits.device
    vt = vocab_total or V
    eps = float(label_smoothing)
    valid = tgt != ignore_index
    local = tgt - vocab_start
    mine = valid & (local >= 0) & (local < V)
    idx = torch.where(mine, local, torch.zeros_like(local))[:, None]
    # fp32 logits without softcap hold e = exp(z - row max) in place after pass 1 (one exp per
    # logit); other dtypes / softcap recompute z from the logits in pass 2 (fp32 block temporaries)
    keep_exp = logits.dtype == torch.float32 and not softcap
    m_loc = torch.empty(c, dtype=torch.float32, device=dev)
    s = torch.empty(c, dtype=torch.float32, device=dev)
    z_t = torch.zeros(c, dtype=torch.float32, device=dev)
    z_sum = torch.zeros(c, dtype=torch.float32, device=dev)
    for r0, r1 in row_blocks(c, V):
        z, _ = _capped(logits[r0:r1].float(), softcap)
        m_loc[r0:r1] = z.amax(dim=1)
        z_t[r0:r1] = z.gather(1, idx[r0:r1]).squeeze(1)
        if eps:
            z_sum[r0:r1] = z.sum(dim=1)
        e = z.sub_(m_loc[r0:r1, None]) if keep_exp else z - m_loc[r0:r1, None]
        s[r0:r1] = e.exp_().sum(dim=1)
    z_t = torch.where(mine, z_t, torch.zeros_like(z_t))
    m = m_loc
    if reduce_max is not None:
        m = m_loc.clone()
        reduce_max(m)
        stats = torch.stack([s * torch.exp(m_loc - m), z_t, z_sum])
        reduce_sum(stats)
        s, z_t, z_sum = stats
    lse = m + s.log()
    row_loss = (1.0 - eps) * (lse - z_t)
    if eps:
        row_loss = row_loss + eps * (lse - z_sum / vt)
    if z_loss:
        row_loss = row_loss + z_loss * lse * lse
    row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))

    # d loss / d z = p * (1 + 2 z_loss lse) - (1 - eps) onehot - eps / V, times rf = valid * scale
    rf = valid.to(torch.float32) * scale
    coef = rf * (1.0 + 2.0 * z_loss * lse) if z_loss else rf
    hit = (-(1.0 - eps) * rf * mine)[:, None]
    if keep_exp:
        coef = coef * torch.exp(m_loc - lse)  # p = e * exp(m_loc - lse)
    for r0, r1 in row_blocks(c, V):
        block = logits[r0:r1]
        if keep_exp:
            g, t = block.mul_(coef[r0:r1, None]), None
        else:
            z, t = _capped(block.float(), softcap)
            g = z.sub_(lse[r0:r1, None]).exp_().mul_(coef[r0:r1, None])
        g.scatter_add_(1, idx[r0:r1], hit[r0:r1])
        if eps:
            g.sub_((eps / vt * rf[r0:r1])[:, None])
        if t is not None:
            g.mul_(1.0 - t * t)
        if not keep_exp:
            block.copy_(g)
    return row_loss.sum()


def _apply(h, weight, targets, step, *, ignore_index, reduction, chunk_size):
    """The shared driver with `step(logits, tgt, valid, scale)`; scale = 1 or 1 / n_valid."""
    valid_all = targets != ignore_index
    if reduction == "mean":
        scale = 1.0 / valid_all.sum().clamp(min=1).to(torch.float32)
    else:
        scale = torch.ones((), dtype=torch.float32, device=h.device)

    def run(need_grad_h, need_grad_w):
        loss, gh, gw = chunked_linear_loss(h, weight, lambda z, lo, hi: step(z, targets[lo:hi], scale),
                                           chunk_tokens=chunk_size, need_grad_h=need_grad_h, need_grad_w=need_grad_w)
        return loss * scale, gh, gw

    return apply_chunked_loss(h, weight, run)


def _linear_cross_entropy(step_impl, h, weight, targets, *, ignore_index, reduction, z_loss, label_smoothing,
                          softcap, chunk_size):
    """Checks, then the shared driver with `step_impl` (softmax_grad_torch or the Triton step)."""
    _check_args(h, weight, targets, reduction, chunk_size)
    check_targets(targets, weight.shape[0], ignore_index, "linear_cross_entropy")
    targets = targets.contiguous()
    softcap = float(softcap) if softcap else None

    def step(logits, tgt, scale):
        return step_impl(logits, tgt, scale, ignore_index=ignore_index, z_loss=float(z_loss),
                         label_smoothing=float(label_smoothing), softcap=softcap)

    return _apply(h, weight, targets, step, ignore_index=ignore_index, reduction=reduction, chunk_size=int(chunk_size))


def linear_cross_entropy_torch(h, weight, targets, *, ignore_index: int = -100, reduction: str = "sum",
                               z_loss: float = 0.0, label_smoothing: float = 0.0, softcap: float | None = None,
                               chunk_size: int = 0):
    return _linear_cross_entropy(softmax_grad_torch, h, weight, targets, ignore_index=ignore_index,
                                 reduction=reduction, z_loss=z_loss, label_smoothing=label_smoothing, softcap=softcap,
                                 chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------
# Triton: per-row softmax / loss / dlogits over one chunk of logits
# ---------------------------------------------------------------------------------------------

# The interpreter runs every program and every loop step in Python: a small block makes the
# online (multi-block) path run in tests; on GPU one program streams a row in 4k-wide blocks.
def _max_block_v() -> int:
    return 256 if triton_interpreting() else 4096


@triton.jit
def _tanh(x):
    # tanh from exp (no libdevice under the interpreter), in the form that never overflows:
    # e = exp(-2|x|) in (0, 1], tanh(|x|) = (1 - e) / (1 + e), sign restored.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def settle_row_without_target(dlogits_row, loss_slot, out_of_range, V, BLOCK_V: tl.constexpr):
    """An ignored token gets no loss and a zero gradient row. A target outside [0, V) (the
    launchers check first; this guards direct callers) is never read: its loss is NaN so it cannot
    pass unseen."""
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        tl.store(dlogits_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(dlogits_row.dtype.element_ty),
                 mask=cols < V)
    tl.store(loss_slot, tl.where(out_of_range, float("nan"), 0.0))


@triton.jit
def _ce_chunk_kernel(logits_ptr, stride_row, targets_ptr, loss_ptr, scale_ptr, V, ignore_index,
                     z_loss, label_smoothing, softcap,
                     HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    # logits are read in their own dtype (fp32/bf16/fp16), upcast right after the load, and the
    # dlogits are stored back over them in that dtype
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    tgt = tl.load(targets_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    out_of_range = (tgt != ignore_index) & ((tgt < 0) | (tgt >= V))
    if (tgt == ignore_index) | out_of_range:
        settle_row_without_target(row_ptr, loss_ptr + row, out_of_range, V, BLOCK_V)
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
        # pass 1: online max / sum-exp (and sum of z for label smoothing)
        m = -float("inf")
        s = 0.0
        z_sum = 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh(x / softcap)
            x = tl.where(mask, x, -float("inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = m + tl.log(s)
        z_t = tl.load(row_ptr + tgt).to(tl.float32)
        if HAS_SOFTCAP:
            z_t = softcap * _tanh(z_t / softcap)
        loss = (1.0 - label_smoothing) * (lse - z_t)
        if HAS_SMOOTHING:
            loss += label_smoothing * (lse - z_sum / V)
        coef = 1.0
        if HAS_ZLOSS:
            loss += z_loss * lse * lse
            coef = 1.0 + 2.0 * z_loss * lse
        tl.store(loss_ptr + row, loss)
        # pass 2: dlogits = (p * coef - (1 - eps) * onehot - eps / V) * dz/dx * scale, in place
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                z = softcap * t
            else:
                z = x
            g = tl.exp(z - lse) * coef
            g = g - tl.where(cols == tgt, 1.0 - label_smoothing, 0.0)
            if HAS_SMOOTHING:
                g = g - label_smoothing / V
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(row_ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _softmax_grad_triton(logits, tgt, scale, *, ignore_index, z_loss, label_smoothing, softcap):
    c, V = logits.shape
    assert logits.stride(1) == 1
    row_loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    block_v = min(triton.next_power_of_2(V), _max_block_v())
    num_warps = 4 if block_v <= 1024 else (8 if block_v <= 4096 else 16)
    _ce_chunk_kernel[(c,)](
        logits, logits.stride(0), tgt, row_loss, scale, V, ignore_index,
        float(z_loss), float(label_smoothing), float(softcap or 1.0),
        HAS_SOFTCAP=bool(softcap), HAS_SMOOTHING=bool(label_smoothing), HAS_ZLOSS=bool(z_loss),
        BLOCK_V=block_v, num_warps=num_warps)
    return row_loss.sum()


def linear_cross_entropy_triton(h, weight, targets, *, ignore_index: int = -100, reduction: str = "sum",
                                z_loss: float = 0.0, label_smoothing: float = 0.0, softcap: float | None = None,
                                chunk_size: int = 0):
    """Chunked linear + CE whose per-chunk softmax/loss/dlogits step is `_ce_chunk_kernel`.
    The per-chunk GEMMs (logits, grad_h, grad_W) are torch (see the module docstring)."""
    if h.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError("linear_cross_entropy_triton: CPU tensors need TRITON_INTERPRET=1 (Triton interpreter)")
    return _linear_cross_entropy(_softmax_grad_triton, h, weight, targets, ignore_index=ignore_index,
                                 reduction=reduction, z_loss=z_loss, label_smoothing=label_smoothing, softcap=softcap,
                                 chunk_size=chunk_size)
