"""Causal grouped-query attention. q: [B, T, H, D], k/v: [B, T, Hkv, D] -> [B, T, H, D].
doc_ids: optional [B, T] ints; a query attends only to keys of the same document (packing).

Three implementations:

- `attention_reference`: plain torch, fp32 math, materialises the T x T scores (tests only);
- `attention_torch`: SDPA (the CPU path);
- `attention_triton`: our FlashAttention-2 kernels (forward with online softmax, backward by
  recomputation), run on CUDA or, for tests, on CPU under the Triton interpreter.

Kernel layout notes (Triton path):

- q/k/v/o/dO are read in their [B, T, H, D] layout through strides: no transpose or copy.
- GQA: query head h reads kv head h // (H // Hkv); repeated K/V are never materialised.
- The forward stores the per-row log-sum-exp (fp32, base 2, [B, H, T]) used by the backward to
  recompute the probabilities block by block; no T x T matrix exists in memory.
- Causal masking skips key blocks that are entirely above the diagonal (loop bounds), the
  remaining blocks get an elementwise mask. doc_ids add an elementwise same-document mask.
- Head dims that are not a power of two are padded up (tl.arange + mask) to BLOCK_D >= 16.
- Backward: `_bwd_preprocess` (delta = rowsum(dO * O)), `_bwd_dkdv` (one program per key block
  of one *kv* head: it loops over the H / Hkv query heads of its group and over query blocks,
  so the GQA reduction of dK/dV happens in fp32 registers inside the kernel, deterministic, and no
  [B, T, H, D] fp32 buffer is needed), `_bwd_dq` (one program per query block, loops over key
  blocks; deterministic, no atomics).
- All accumulation is fp32. On GPU fp16/bf16 operands go to tl.dot as they are; fp32 operands
  use input_precision="ieee" (no TF32) so fp32 results match the reference.
- Under the Triton interpreter (TRITON_INTERPRET=1) bf16 arithmetic is wrong (upstream triton
  issue 11584, bf16 held as raw uint16 bits) so loads are upcast to fp32 right after tl.load
  there (UPCAST); and `triton.autotune` with several configs fails ("0 active drivers"), so a
  single small fixed config is used when interpreting.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


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


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _configs(interpret_shape, gpu_shapes):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples -> autotune configs. One fixed config under
    the interpreter (autotune with >= 2 configs fails there: "0 active drivers"); several
    Ampere/Hopper-friendly block shapes on GPU."""
    shapes = [interpret_shape] if _INTERPRET else gpu_shapes
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Interpreter blocks: the interpreter's cost is per block operation, so mid-size blocks are the
# fastest; BLOCK_M != BLOCK_N (swapped between forward and backward) keeps the causal loop bounds
# for unequal blocks covered by the CPU tests.
_FWD_CONFIGS = _configs((64, 32, 4, 1), [
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 32, 4, 4),
])
# Backward: dK/dV programs own a key block of BLOCK_N rows and stream BLOCK_M query rows (and the
# reverse for dQ); smaller tiles than the forward keep the several fp32 accumulators in registers.
_BWD_CONFIGS = _configs((32, 64, 4, 1), [
    (64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2), (32, 32, 4, 3),
])
_KEY = ["T", "BLOCK_D", "CAUSAL", "HAS_DOC"]


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, DOC,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, sdb, sdt,
    T, H, D, GROUP, qk_scale,  # qk_scale = softmax scale * log2(e)
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D  # head dim padded up to BLOCK_D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    doc_base = DOC + b * sdb
    doc_m = offs_m
    if HAS_DOC:
        doc_m = tl.load(doc_base + offs_m * sdt, mask=offs_m < T, other=-2)

    # m starts finite so rows with no allowed key (only padding rows beyond T) stay NaN-free.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = T
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T)  # key blocks past the diagonal are skipped
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=(offs_n[:, None] < T) & d_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=(offs_n[:, None] < T) & d_ok, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        if HAS_DOC:
            doc_n = tl.load(doc_base + offs_n * sdt, mask=offs_n < T, other=-1)
            ok = ok & (doc_m[:, None] == doc_n[None, :])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows beyond T (not stored) have no allowed key
    out = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < T) & d_ok)
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


@triton.jit
def _bwd_preprocess(
    O, DO, DELTA, sob, sot, soh, sdob, sdot, sdoh, T, H, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, t] = sum_d dO * O (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D  # head dim padded up to BLOCK_D
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :],
                 mask=(offs_m[:, None] < T) & d_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
    sdkb, sdkt, sdkh, sdvb, sdvt, sdvh, sdb, sdt,
    T, H, Hkv, D, GROUP, scale, qk_scale,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = one key block of one kv head. GQA: loops over the GROUP query heads sharing
    the kv head and sums their contributions in fp32 (no per-query-head buffer, deterministic)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D  # head dim padded up to BLOCK_D

    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :],
                mask=(offs_n[:, None] < T) & d_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :],
                mask=(offs_n[:, None] < T) & d_ok, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    doc_base = DOC + b * sdb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # query blocks entirely above this key block are skipped
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (b * H + h) * T
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=(offs_m[:, None] < T) & d_ok, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :],
                         mask=(offs_m[:, None] < T) & d_ok, other=0.0)
            if UPCAST:
                do = do.to(tl.float32)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < T, other=0.0)
            doc_m = offs_m
            if HAS_DOC:
                doc_m = tl.load(doc_base + offs_m * sdt, mask=offs_m < T, other=-2)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            if HAS_DOC:
                doc_n = tl.load(doc_base + offs_n * sdt, mask=offs_n < T, other=-1)
                ok = ok & (doc_m[:, None] == doc_n[None, :])
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)

    dk = dk * scale
    mask = (offs_n[:, None] < T) & d_ok
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=mask)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=mask)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DOC,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sdb, sdt,
    T, H, D, GROUP, scale, qk_scale,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = one query block of one query head; loops over key blocks (no atomics)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D  # head dim padded up to BLOCK_D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :],
                 mask=(offs_m[:, None] < T) & d_ok, other=0.0)
    if UPCAST:
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    doc_base = DOC + b * sdb
    doc_m = offs_m
    if HAS_DOC:
        doc_m = tl.load(doc_base + offs_m * sdt, mask=offs_m < T, other=-2)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = T
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=(offs_n[:, None] < T) & d_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=(offs_n[:, None] < T) & d_ok, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        if HAS_DOC:
            doc_n = tl.load(doc_base + offs_n * sdt, mask=offs_n < T, other=-1)
            ok = ok & (doc_m[:, None] == doc_n[None, :])
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < T) & d_ok)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, doc_ids):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention_triton: {name} must be a 4-D tensor [B, T, heads, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention_triton: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"attention_triton: unsupported dtype {q.dtype} (supported: fp16, bf16, fp32)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention_triton: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _INTERPRET):
        raise RuntimeError(f"attention_triton: tensors on {q.device} need CUDA, or CPU with TRITON_INTERPRET=1 "
                           "set before llmstack.kernels is imported (use the torch backend instead)")
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"attention_triton: k/v must be [B={B}, T={T}, Hkv, D={D}], got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (different query/key lengths are not supported)")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"attention_triton: empty input q {tuple(q.shape)}, k {tuple(k.shape)}")
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"attention_triton: query heads {H} must be a multiple of kv heads {Hkv}")
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"attention_triton: head dim {D} not supported (1..{_MAX_HEAD_DIM})")
    if doc_ids is not None:
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.shape != (B, T):
            raise ValueError(f"attention_triton: doc_ids must be a [B={B}, T={T}] tensor, got "
                             f"{tuple(doc_ids.shape) if isinstance(doc_ids, torch.Tensor) else type(doc_ids)}")
        if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
            raise TypeError(f"attention_triton: doc_ids must be integer, got {doc_ids.dtype}")
        if doc_ids.device != q.device:
            raise ValueError(f"attention_triton: doc_ids on {doc_ids.device}, q on {q.device}")


def _meta(q):
    D = q.shape[3]
    return dict(
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16,  # triton issue 11584
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for fp16/bf16 operands
    )


def _contig_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, doc_ids):
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        meta = _meta(q)
        o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
        has_doc = doc_ids is not None
        doc = doc_ids if has_doc else lse  # dummy pointer, never read when HAS_DOC is False
        sdb, sdt = (doc_ids.stride(0), doc_ids.stride(1)) if has_doc else (0, 0)
        grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd[grid](
            q, k, v, o, lse, doc,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), sdb, sdt,
            T, H, D, H // Hkv, scale * _LOG2E,
            CAUSAL=causal, HAS_DOC=has_doc, **meta,
        )
        ctx.save_for_backward(q, k, v, o, lse, doc_ids if has_doc else None)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc_ids = ctx.saved_tensors
        causal, scale = ctx.causal, ctx.scale
        do = _contig_last(do)
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        G = H // Hkv
        meta = _meta(q)
        has_doc = doc_ids is not None
        doc = doc_ids if has_doc else lse
        sdb, sdt = (doc_ids.stride(0), doc_ids.stride(1)) if has_doc else (0, 0)

        delta = torch.empty_like(lse)
        pre_m = 32 if _INTERPRET else 64
        _bwd_preprocess[(triton.cdiv(T, pre_m), B * H)](
            o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
            T, H, D, BLOCK_M=pre_m, BLOCK_D=meta["BLOCK_D"],
        )

        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
        _bwd_dkdv[lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, doc, *strides,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), sdb, sdt,
            T, H, Hkv, D, G, scale, scale * _LOG2E,
            CAUSAL=causal, HAS_DOC=has_doc, **meta,
        )
        _bwd_dq[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, doc, *strides,
            dq.stride(0), dq.stride(1), dq.stride(2), sdb, sdt,
            T, H, D, G, scale, scale * _LOG2E,
            CAUSAL=causal, HAS_DOC=has_doc, **meta,
        )
        return dq, dk, dv, None, None, None


def attention_triton(q, k, v, *, causal: bool = True, scale: float | None = None, doc_ids=None):
    """FlashAttention-2 (Triton). q: [B, T, H, D], k/v: [B, T, Hkv, D] -> [B, T, H, D] in q.dtype.

    Raises (never falls back) on inputs the kernels do not handle: other dtypes, mismatched
    shapes/devices, head dim > 256, CPU tensors without TRITON_INTERPRET=1."""
    _check_inputs(q, k, v, doc_ids)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[3])
    q, k, v = _contig_last(q), _contig_last(k), _contig_last(v)
    return _FlashAttention.apply(q, k, v, bool(causal), scale, doc_ids)
