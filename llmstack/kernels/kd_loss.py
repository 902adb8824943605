"""Fused distillation loss: hard-label CE + temperature-scaled KD divergence between the student's
logits (h_s @ W_s.T) and the teacher's (h_t @ W_t.T), without ever holding either [N, V] logits.

Per valid token (target != ignore_index), with p = softmax(z_s / T), q = softmax(z_t / T):

    loss = (1 - alpha) * CE(z_s, target) + alpha * T^2 * D(q, p)

    forward_kl:  D = KL(q || p) = sum q (log q - log p)          (the usual KD, "mean seeking")
    reverse_kl:  D = KL(p || q) = sum p (log p - log q)          ("mode seeking")
    jsd (beta):  D = beta KL(q || m) + (1 - beta) KL(p || m),  m = beta q + (1 - beta) p
                 (generalized JSD of Agarwal et al. 2024: beta -> 0 tends to forward KL / beta,
                 beta -> 1 to reverse KL / (1 - beta))

The T^2 factor (Hinton et al. 2015) keeps the KD gradient's size independent of T: the softened
logits z/T put a 1/T on every gradient and the soft targets shrink it by another ~1/T.
Gradients wrt the student logits (s = z_s / T, dz_s = ds / T):

    forward_kl: dD/ds = p - q
    reverse_kl: dD/ds = p * (g - <p, g>),  g = log p - log q
    jsd:        dD/ds = p * (g - <p, g>),  g = (1 - beta) (log p - log m)

Implementations, one signature
``fn(h_s, w_s, h_t, w_t, targets, *, kind, temperature, alpha, beta, ignore_index, chunk_size)``
-> fp32 scalar, the SUM over valid tokens (the trainer divides by the global token count):

- `kd_loss_reference`: naive, materialises both logits, autograd does the rest (tests only).
- `kd_loss_torch`: the shared chunk driver (`chunked_loss.py`): per chunk the student logits
  (and, in the step, the teacher's) in the GEMM dtype, the loss and right away dlogits written
  over the student logits; grad_h[chunk] = dlogits @ W_s and grad_W_s += dlogits.T @ h_s in fp32,
  in place. Only [c, V] buffers are alive; backward scales the stored grads by grad_output.
- `kd_loss_triton`: same driver; the per-chunk softmax / divergence / dlogits step is the
  Triton kernel `_kd_chunk_kernel` (one program per token row, three streaming passes over V:
  online log-sum-exps, divergence + <p, g>, then dlogits written over the student logits).

Teacher tensors never get gradients (the teacher is frozen). Precision: the logits are the GEMMs'
outputs in the inputs' dtype (fp32 accumulation); everything computed from them is fp32.
`chunk_size=0` sizes chunks by the driver's memory budget. A target outside [0, V) that is not
ignore_index raises `TargetOutOfRange`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmstack.kernels import triton_interpreting
from llmstack.kernels.chunked_loss import (apply_chunked_loss, check_targets, chunked_linear_loss, compute_dtype,
                                           row_blocks)
from llmstack.kernels.cross_entropy import settle_row_without_target

KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class KDOptions:
    kind: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    ignore_index: int = -100
    chunk_size: int = 0  # 0 = sized by the driver's memory budget

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kd_loss: kind must be one of {KINDS}, got {self.kind!r}")
        if self.temperature <= 0 or not 0 <= self.alpha <= 1 or not 0 < self.beta < 1 or self.chunk_size < 0:
            raise ValueError(f"kd_loss: bad options {self}")


def divergence_reference(zs: torch.Tensor, zt: torch.Tensor, kind: str, temperature: float, beta: float) -> torch.Tensor:
    """Per-row divergence D of the softened distributions (fp32, from full logits)."""
    lp = F.log_softmax(zs.float() / temperature, dim=-1)
    lq = F.log_softmax(zt.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return (lq.exp() * (lq - lp)).sum(-1)
    if kind == "reverse_kl":
        return (lp.exp() * (lp - lq)).sum(-1)
    lm = torch.logaddexp(lq + math.log(beta), lp + math.log(1 - beta))
    return beta * (lq.exp() * (lq - lm)).sum(-1) + (1 - beta) * (lp.exp() * (lp - lm)).sum(-1)


def kd_loss_reference(h_s, w_s, targets, *, h_t, w_t, kind="forward_kl", temperature=1.0, alpha=0.5, beta=0.5,
                      ignore_index=-100, chunk_size=0):
    zs = (h_s @ w_s.t()).float()
    with torch.no_grad():
        zt = (h_t @ w_t.t()).float()
    valid = targets != ignore_index
    ce = F.cross_entropy(zs, targets, ignore_index=ignore_index, reduction="sum")
    kd = divergence_reference(zs, zt, kind, temperature, beta)[valid].sum()
    return (1 - alpha) * ce + alpha * temperature ** 2 * kd


# ---------------------------------------------------------------------------------------------
# per-chunk step, plain torch
# ---------------------------------------------------------------------------------------------

def _kd_chunk_torch(zs, zt, tgt, valid, scale, o: KDOptions):
    """zs [c, V] (any float dtype) is overwritten with dloss/dzs (times scale, zero on ignored
    rows); the math is fp32, in blocks of rows (rows are independent). Returns the summed loss."""
    total = torch.zeros((), dtype=torch.float32, device=zs.device)
    # ~8 fp32 temporaries of the block's size are alive at once
    for r0, r1 in row_blocks(*zs.shape, temporaries=8):
        block = zs[r0:r1]
        zf = block.float()  # fp32 logits: the block itself, updated in place
        total += _kd_rows_torch(zf, zt[r0:r1].float(), tgt[r0:r1], valid[r0:r1], scale, o)
        if block.dtype != torch.float32:
            block.copy_(zf)
    return total


def _kd_rows_torch(zs, zt, tgt, valid, scale, o: KDOptions):
    T = o.temperature
    lp = F.log_softmax(zs / T, dim=-1)
    lq = F.log_softmax(zt / T, dim=-1)
    p = lp.exp()
    if o.kind == "forward_kl":
        q = lq.exp()
        kd = (q * (lq - lp)).sum(-1)
        g_s = p - q
    else:
        if o.kind == "reverse_kl":
            g = lp - lq
            kd = (p * g).sum(-1)
        else:
            lm = torch.logaddexp(lq + math.log(o.beta), lp + math.log(1 - o.beta))
            kd = o.beta * (lq.exp() * (lq - lm)).sum(-1) + (1 - o.beta) * (p * (lp - lm)).sum(-1)
            g = (1 - o.beta) * (lp - lm)
        g_s = p * (g - (p * g).sum(-1, keepdim=True))
    safe_tgt = torch.where(valid, tgt, torch.zeros_like(tgt))
    lse = torch.logsumexp(zs, dim=-1)
    ce = lse - zs.gather(1, safe_tgt[:, None])[:, 0]
    row = (1 - o.alpha) * ce + o.alpha * T * T * kd
    # d/dzs: (1 - alpha)(softmax(zs) - onehot) + alpha T^2 (1/T) dD/ds
    d = zs.sub_(lse[:, None]).exp_().mul_(1 - o.alpha)
    d.scatter_add_(1, safe_tgt[:, None], torch.full_like(ce, -(1 - o.alpha))[:, None])
    d.add_(g_s, alpha=o.alpha * T)
    d.mul_((valid.float() * scale)[:, None])
    return torch.where(valid, row, torch.zeros_like(row)).sum()


# ---------------------------------------------------------------------------------------------
# per-chunk step, Triton
# ---------------------------------------------------------------------------------------------

def _max_block_v() -> int:
    return 256 if triton_interpreting() else 4096


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    return m + tl.log(tl.exp(a - m) + tl.exp(b - m))


@triton.jit
def _log_probs(zs_row, zt_row, cols, mask, inv_t, lse_s, lse_t):
    """One block of the student's logits, the tempered student / teacher log-probabilities and the
    student's probabilities."""
    zs = tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32)
    zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32)
    lp = zs * inv_t - lse_s
    lq = zt * inv_t - lse_t
    return zs, lp, lq, tl.exp(lp)


@triton.jit
def _kd_chunk_kernel(zs_ptr, zt_ptr, stride_s, stride_t, targets_ptr, loss_ptr, scale_ptr, V, ignore_index,
                     inv_t, alpha, beta, log_beta, log_1mbeta,
                     KIND: tl.constexpr, BLOCK_V: tl.constexpr):
    # KIND: 0 forward KL, 1 reverse KL, 2 JSD
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    tgt = tl.load(targets_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    # logits are read in their own dtype and upcast at once; dlogits are stored in that dtype
    out_of_range = (tgt != ignore_index) & ((tgt < 0) | (tgt >= V))
    if (tgt == ignore_index) | out_of_range:
        settle_row_without_target(zs_row, loss_ptr + row, out_of_range, V, BLOCK_V)
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
        # pass 1: online log-sum-exp of zs, zs / T and zt / T
        m1, s1 = -float("inf"), 0.0
        ms, ss = -float("inf"), 0.0
        mt, st = -float("inf"), 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            zs = tl.load(zs_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            zt = tl.load(zt_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            n1 = tl.maximum(m1, tl.max(zs, axis=0))
            s1 = s1 * tl.exp(m1 - n1) + tl.sum(tl.exp(zs - n1), axis=0)
            m1 = n1
            a = zs * inv_t
            ns = tl.maximum(ms, tl.max(a, axis=0))
            ss = ss * tl.exp(ms - ns) + tl.sum(tl.exp(a - ns), axis=0)
            ms = ns
            b = zt * inv_t
            nt = tl.maximum(mt, tl.max(b, axis=0))
            st = st * tl.exp(mt - nt) + tl.sum(tl.exp(b - nt), axis=0)
            mt = nt
        lse1 = m1 + tl.log(s1)
        lse_s = ms + tl.log(ss)
        lse_t = mt + tl.log(st)
        # pass 2: divergence and <p, g>
        kd = 0.0
        pg = 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            zs, lp, lq, p = _log_probs(zs_row, zt_row, cols, mask, inv_t, lse_s, lse_t)
            if KIND == 0:
                term = tl.exp(lq) * (lq - lp)
                g = lp * 0.0
            elif KIND == 1:
                g = lp - lq
                term = p * g
            else:
                lm = _logaddexp(lq + log_beta, lp + log_1mbeta)
                term = beta * tl.exp(lq) * (lq - lm) + (1.0 - beta) * p * (lp - lm)
                g = (1.0 - beta) * (lp - lm)
            kd += tl.sum(tl.where(mask, term, 0.0), axis=0)
            pg += tl.sum(tl.where(mask, p * g, 0.0), axis=0)
        z_tgt = tl.load(zs_row + tgt).to(tl.float32)
        ce = lse1 - z_tgt
        tl.store(loss_ptr + row, (1.0 - alpha) * ce + alpha * kd / (inv_t * inv_t))
        # pass 3: dlogits over the student logits, in place
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            zs, lp, lq, p = _log_probs(zs_row, zt_row, cols, mask, inv_t, lse_s, lse_t)
            if KIND == 0:
                gs = p - tl.exp(lq)
            elif KIND == 1:
                gs = p * ((lp - lq) - pg)
            else:
                lm = _logaddexp(lq + log_beta, lp + log_1mbeta)
                gs = p * ((1.0 - beta) * (lp - lm) - pg)
            d = (1.0 - alpha) * (tl.exp(zs - lse1) - tl.where(cols == tgt, 1.0, 0.0)) + alpha * gs / inv_t
            tl.store(zs_row + cols, (d * scale).to(zs_ptr.dtype.element_ty), mask=mask)


def _kd_chunk_triton(zs, zt, tgt, valid, scale, o: KDOptions):
    c, V = zs.shape
    assert zs.stride(1) == 1 and zt.stride(1) == 1
    row_loss = torch.empty(c, dtype=torch.float32, device=zs.device)
    block_v = min(triton.next_power_of_2(V), _max_block_v())
    _kd_chunk_kernel[(c,)](zs, zt, zs.stride(0), zt.stride(0), tgt, row_loss, scale, V, o.ignore_index,
                           1.0 / o.temperature, o.alpha, o.beta, math.log(o.beta), math.log(1 - o.beta),
                           KIND=KINDS.index(o.kind), BLOCK_V=block_v, num_warps=4 if block_v <= 1024 else 8)
    return row_loss.sum()


# ---------------------------------------------------------------------------------------------
# the shared chunk driver, with the teacher's logits computed chunk by chunk in the step
# ---------------------------------------------------------------------------------------------

def _apply(h_s, w_s, h_t, w_t, targets, options: KDOptions, step):
    if h_s.dim() != 2 or h_t.dim() != 2 or w_s.shape[0] != w_t.shape[0] or h_s.shape[0] != h_t.shape[0]:
        raise ValueError(f"kd_loss: h_s [N, D], w_s [V, D], h_t [N, Dt], w_t [V, Dt] expected, got "
                         f"{tuple(h_s.shape)}, {tuple(w_s.shape)}, {tuple(h_t.shape)}, {tuple(w_t.shape)}")
    check_targets(targets, w_s.shape[0], options.ignore_index, "kd_loss")
    targets = targets.contiguous()
    valid_all = targets != options.ignore_index
    scale = torch.ones((), dtype=torch.float32, device=h_s.device)
    h_t, w_t = h_t.detach(), w_t.detach()
    tdt = compute_dtype(h_t, w_t)
    teacher = {}

    def chunk_step(zs, lo, hi):
        if "w" not in teacher:  # the GEMMs run with autocast off: cast the teacher once per call
            teacher["w"] = w_t.to(tdt)
            teacher["buf"] = torch.empty((zs.shape[0], w_t.shape[0]), dtype=tdt, device=zs.device)
        zt = teacher["buf"][: hi - lo]
        torch.mm(h_t[lo:hi].to(tdt), teacher["w"].t(), out=zt)
        return step(zs, zt, targets[lo:hi], valid_all[lo:hi], scale, options)

    def run(need_grad_h, need_grad_w):
        teacher.clear()
        return chunked_linear_loss(h_s, w_s, chunk_step, chunk_tokens=options.chunk_size, need_grad_h=need_grad_h,
                                   need_grad_w=need_grad_w)

    return apply_chunked_loss(h_s, w_s, run)


def kd_loss_torch(h_s, w_s, targets, *, h_t, w_t, **options):
    return _apply(h_s, w_s, h_t, w_t, targets, KDOptions(**options), _kd_chunk_torch)


def kd_loss_triton(h_s, w_s, targets, *, h_t, w_t, **options):
    if h_s.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError("kd_loss_triton: CPU tensors need TRITON_INTERPRET=1 (Triton interpreter)")
    return _apply(h_s, w_s, h_t, w_t, targets, KDOptions(**options), _kd_chunk_triton)


def kd_loss(h_s, w_s, targets, *, h_t, w_t, backend: str = "torch", **options):
    """The public entry: fused CE + KD loss sum; backend "torch" or "triton" (see module doc).
    The student's hidden states and head are positional (as in linear_cross_entropy), the
    teacher's are keywords: the two pairs have the same shapes and would swap silently."""
    fn = kd_loss_triton if backend == "triton" else kd_loss_torch
    return fn(h_s, w_s, targets, h_t=h_t, w_t=w_t, **options)
