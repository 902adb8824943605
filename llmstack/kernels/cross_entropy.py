"""Fused linear + cross-entropy: loss of (h @ W.T) against targets without ever holding the
[N, V] logits.

Three implementations with one signature
``fn(h, weight, targets, *, ignore_index=-100, reduction="sum"|"mean", z_loss=0.0,
label_smoothing=0.0, softcap=None, chunk_size=4096)`` -> fp32 scalar:

- `linear_cross_entropy_reference`: naive, materialises the logits (tests and benchmarks only).
- `linear_cross_entropy_torch`: chunked, plain torch. For each chunk of `chunk_size` tokens the
  forward computes the chunk's logits, its loss and right away the gradient of the loss wrt
  those logits, then grad_h[chunk] = dlogits @ W and grad_W += dlogits.T @ h[chunk]. Only a
  [chunk, V] buffer is ever alive; the autograd graph keeps grad_h [N, D] and grad_W [V, D]
  (fp32) and the backward just scales them by grad_output. This is the CPU path.
- `linear_cross_entropy_triton`: same chunking, but the per-chunk softmax / loss / dlogits step is
  the Triton kernel `_ce_chunk_kernel` (one program per row, two passes over V in blocks: an
  online max / sum-exp pass, then a pass that overwrites the logits with dlogits in place). The
  three matmuls per chunk are `torch.matmul` / `torch.mm` (cuBLAS on GPU: the GEMMs are not where
  this op loses time or memory, and cuBLAS beats our tiled GEMM at these shapes).

Semantics equal the reference exactly: softcap s maps logits z -> s * tanh(z / s) before the
softmax; label smoothing eps is torch's (loss = (1 - eps) * nll + eps * (lse - mean_j z_j));
z_loss adds z_loss * lse^2 per valid token; ignored tokens contribute nothing; "mean" divides by
the number of non-ignored targets (at least 1).

Precision: logits, softmax, loss and dlogits are always fp32. With bf16/fp16 inputs (or under
autocast) the matmuls run in that dtype (fp32 accumulation inside the GEMM), grad_W is
accumulated across chunks in an fp32 buffer and returned in the weight's dtype, grad_h is stored
in h's dtype. The 1/n_valid scale of "mean" stays a device tensor (no host sync).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_REDUCTIONS = ("sum", "mean")


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


# ---------------------------------------------------------------------------------------------
# shared chunk driver
# ---------------------------------------------------------------------------------------------

def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's dtype if autocast is on, else the promoted one."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def _check_args(h, weight, targets, reduction, chunk_size):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h [N, D] and weight [V, D] expected, got {tuple(h.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets [N] expected, got {tuple(targets.shape)} for N={h.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")


def _softmax_grad_torch(logits, tgt, valid, scale, *, z_loss, label_smoothing, softcap):
    """Per-chunk loss step in plain torch. `logits` [c, V] fp32 is overwritten with dlogits
    (already multiplied by `scale` and zero on ignored rows). Returns the chunk's summed loss
    (unscaled, fp32 0-d tensor)."""
    V = logits.shape[1]
    if softcap:
        # z = s * tanh(x / s); keep t = tanh(x / s) for the chain rule dz/dx = 1 - t^2.
        t = logits.div_(softcap).tanh_()
        z = t * softcap
    else:
        t = None
        z = logits
    safe_tgt = torch.where(valid, tgt, torch.zeros_like(tgt))
    z_t = z.gather(1, safe_tgt[:, None]).squeeze(1)
    eps = label_smoothing
    z_mean = z.mean(dim=-1) if eps else None
    # logsumexp by hand so exp(z - max) is computed once, in z's storage, and reused as p
    m = z.amax(dim=-1)
    e = z.sub_(m[:, None]).exp_()
    s = e.sum(dim=-1)
    lse = m + s.log()                                                 # [c]
    row_loss = (1.0 - eps) * (lse - z_t)
    if eps:
        row_loss = row_loss + eps * (lse - z_mean)
    if z_loss:
        row_loss = row_loss + z_loss * lse * lse
    row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))

    # d loss / d z = p * (1 + 2 z_loss lse) - (1 - eps) onehot - eps / V, times the row factor
    # rf = valid * scale (folded into the per-row coefficients: one pass over [c, V])
    rf = valid.to(torch.float32) * scale
    coef = rf / s if not z_loss else rf * (1.0 + 2.0 * z_loss * lse) / s
    g = e.mul_(coef[:, None])                                         # p * coef, in z's storage
    g.scatter_add_(1, safe_tgt[:, None], (-(1.0 - eps) * rf)[:, None])
    if eps:
        g.sub_((eps / V * rf)[:, None])
    if t is not None:
        # softcap made z a new tensor, so g lives there: write it back into the logits buffer
        # (decided by the branch, not by comparing data pointers, which torch.compile cannot trace)
        g.mul_(1.0 - t * t)
        logits.copy_(g)
    return row_loss.sum()


def _chunked_forward(h, weight, targets, *, ignore_index, reduction, z_loss, label_smoothing, softcap,
                     chunk_size, need_grad_h, need_grad_w, chunk_step):
    """Loop over token chunks. `chunk_step(logits_fp32, tgt, valid, scale)` turns the chunk's
    logits into dlogits in place and returns the chunk's summed (unscaled) loss."""
    N, D = h.shape
    V = weight.shape[0]
    dev = h.device
    cdt = _compute_dtype(h, weight)
    valid_all = targets != ignore_index
    n_valid = valid_all.sum()
    if reduction == "mean":
        scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
    else:
        scale = torch.ones((), dtype=torch.float32, device=dev)
    need_grad = need_grad_h or need_grad_w
    grad_h = torch.empty((N, D), dtype=h.dtype, device=dev) if need_grad_h else None
    grad_w = torch.zeros((V, D), dtype=torch.float32, device=dev) if need_grad_w else None
    total = torch.zeros((), dtype=torch.float32, device=dev)
    with torch.autocast(device_type=dev.type, enabled=False):
        w_c = weight.to(cdt)
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            h_c = h[start:end].to(cdt)
            logits = torch.mm(h_c, w_c.t())
            if logits.dtype != torch.float32:
                logits = logits.float()
            tgt = targets[start:end]
            valid = valid_all[start:end]
            total += chunk_step(logits, tgt, valid, scale)
            if not need_grad:
                continue
            dlogits = logits if cdt == torch.float32 else logits.to(cdt)
            if need_grad_h:
                if grad_h.dtype == cdt:
                    torch.mm(dlogits, w_c, out=grad_h[start:end])
                else:
                    grad_h[start:end] = torch.mm(dlogits, w_c)
            if need_grad_w:
                if cdt == torch.float32:
                    grad_w.addmm_(dlogits.t(), h_c)
                else:
                    # low-precision GEMM (fp32 accumulate inside), summed across chunks in fp32
                    grad_w += torch.mm(dlogits.t(), h_c).float()
    loss = total * scale
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, z_loss, label_smoothing, softcap, chunk_size,
                chunk_step):
        loss, grad_h, grad_w = _chunked_forward(
            h, weight, targets, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss,
            label_smoothing=label_smoothing, softcap=softcap, chunk_size=chunk_size,
            need_grad_h=ctx.needs_input_grad[0], need_grad_w=ctx.needs_input_grad[1], chunk_step=chunk_step)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        g = grad_out.to(torch.float32)
        dh = dw = None
        if grad_h is not None:
            dh = (grad_h * g).to(grad_h.dtype)
        if grad_w is not None:
            dw = (grad_w * g).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None, None, None


def _apply(h, weight, targets, chunk_step, *, ignore_index, reduction, z_loss, label_smoothing, softcap, chunk_size):
    _check_args(h, weight, targets, reduction, chunk_size)
    softcap = float(softcap) if softcap else None
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, reduction, float(z_loss),
                                         float(label_smoothing), softcap, int(chunk_size), chunk_step)
    loss, _, _ = _chunked_forward(h, weight, targets, ignore_index=ignore_index, reduction=reduction,
                                  z_loss=float(z_loss), label_smoothing=float(label_smoothing), softcap=softcap,
                                  chunk_size=int(chunk_size), need_grad_h=False, need_grad_w=False,
                                  chunk_step=chunk_step)
    return loss


def linear_cross_entropy_torch(h, weight, targets, *, ignore_index: int = -100, reduction: str = "sum",
                               z_loss: float = 0.0, label_smoothing: float = 0.0, softcap: float | None = None,
                               chunk_size: int = 4096):
    def step(logits, tgt, valid, scale):
        return _softmax_grad_torch(logits, tgt, valid, scale, z_loss=z_loss, label_smoothing=label_smoothing,
                                   softcap=softcap)

    return _apply(h, weight, targets, step, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss,
                  label_smoothing=label_smoothing, softcap=softcap, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------
# Triton: per-row softmax / loss / dlogits over one chunk of logits
# ---------------------------------------------------------------------------------------------

# The interpreter runs every program and every loop step in Python: a small block makes the
# online (multi-block) path run in tests; on GPU one program streams a row in 4k-wide blocks.
_MAX_BLOCK_V = 256 if os.environ.get("TRITON_INTERPRET") == "1" else 4096


@triton.jit
def _tanh(x):
    # tanh from exp (no libdevice under the interpreter), in the form that never overflows:
    # e = exp(-2|x|) in (0, 1], tanh(|x|) = (1 - e) / (1 + e), sign restored.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _ce_chunk_kernel(logits_ptr, stride_row, targets_ptr, loss_ptr, scale_ptr, V, ignore_index,
                     z_loss, label_smoothing, softcap,
                     HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    tgt = tl.load(targets_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    if tgt == ignore_index:
        # ignored token: no loss, zero gradient row
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            tl.store(row_ptr + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < V)
        tl.store(loss_ptr + row, 0.0)
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
            tl.store(row_ptr + cols, g * scale, mask=mask)


def _softmax_grad_triton(logits, tgt, valid, scale, *, ignore_index, z_loss, label_smoothing, softcap):
    c, V = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    row_loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    block_v = min(triton.next_power_of_2(V), _MAX_BLOCK_V)
    num_warps = 4 if block_v <= 1024 else (8 if block_v <= 4096 else 16)
    _ce_chunk_kernel[(c,)](
        logits, logits.stride(0), tgt, row_loss, scale, V, ignore_index,
        float(z_loss), float(label_smoothing), float(softcap or 1.0),
        HAS_SOFTCAP=bool(softcap), HAS_SMOOTHING=bool(label_smoothing), HAS_ZLOSS=bool(z_loss),
        BLOCK_V=block_v, num_warps=num_warps)
    return row_loss.sum()


def linear_cross_entropy_triton(h, weight, targets, *, ignore_index: int = -100, reduction: str = "sum",
                                z_loss: float = 0.0, label_smoothing: float = 0.0, softcap: float | None = None,
                                chunk_size: int = 4096):
    """Chunked linear + CE whose per-chunk softmax/loss/dlogits step is `_ce_chunk_kernel`.
    The per-chunk GEMMs (logits, grad_h, grad_W) are torch.mm (see the module docstring)."""
    if h.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("linear_cross_entropy_triton: CPU tensors need TRITON_INTERPRET=1 (Triton interpreter)")
    targets = targets.contiguous()

    def step(logits, tgt, valid, scale):
        return _softmax_grad_triton(logits, tgt, valid, scale, ignore_index=ignore_index, z_loss=z_loss,
                                    label_smoothing=label_smoothing, softcap=softcap)

    return _apply(h, weight, targets, step, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss,
                  label_smoothing=label_smoothing, softcap=softcap, chunk_size=chunk_size)
