"""Triton kernels of `llmstack.kernels.attention` (FlashAttention-2 forward, backward by
recomputation) and their autotune configs. The host side (checks, launches, autograd) is in
attention.py.

Layout: q/k/v/o/dO are [B, T, heads, D] read through strides; GQA query head h reads kv head
h // GROUP. Base offsets (batch, head) are int64, so B*T*H*D may exceed 2^31 elements.

Loop structure (Triton tutorial 06 / FlashAttention-2), per query block [start_m, +BLOCK_M):

- causal: key blocks below the diagonal, [lo, start_m), run with no mask at all; only the
  diagonal blocks [start_m, start_m + BLOCK_M) compute the causal mask (BLOCK_M is a multiple of
  BLOCK_N, so the split falls on block boundaries). Key blocks never go past T in the
  off-diagonal part, so their loads are unmasked too.
- packed documents (doc_ids, non-decreasing along T, as the packed loader makes them): `bounds`
  holds each token's document start and end. Key blocks that end before the query block's
  first document starts are skipped (lo > 0), so the cost follows the document lengths, not T^2.
  Key blocks between the last document start among the query rows and the diagonal hold only
  that document: unmasked. Only the blocks in between (a query block spanning documents, or the
  block holding the document start) compute the document mask. Rows whose ids are not
  non-decreasing get bounds -1: every block is masked and nothing is skipped (still exact).
- divisible lengths: EVEN_T (T a multiple of both blocks, chosen per config by a heuristic) and
  EVEN_D (head dim a power of two >= 16) drop the bounds masks from every load.
- dK/dV (one program per key block of one kv head, looping over the GROUP query heads and the
  query blocks at or after the diagonal) is computed transposed: S^T = K Q^T, dV += P^T dO,
  dP^T = V dO^T, dK += dS^T Q, so P^T and dS^T are produced in the orientation their matmul
  needs and only loaded tiles (Q^T, dO^T) are transposed, never a register tile.
- dQ (one program per query block) mirrors the forward's loop split.

Configs: separate lists per kernel, head-dim bucket (BLOCK_D), operand width (16-bit / fp32) and
GPU generation (sm_90 / sm_80), chosen by `prune_configs_by` so the autotuner only benchmarks
configs that the compile gate (llmstack/kernels/compile_check.py) showed to be spill-free, within
shared memory and on wgmma (sm_90, bf16/fp16). Under the Triton interpreter there is one config
per kernel (autotune with several configs needs a GPU driver); its blocks are unequal so the
CPU tests cover the diagonal split with BLOCK_M != BLOCK_N.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmstack.kernels import triton_interpreting

try:  # host-side TMA descriptors: triton >= 3.4 (the GPU machines run 3.6)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel -> (GPU generation, operand bits, BLOCK_D);
# head dims below 64 use the 64 lists. fwd / dq: BLOCK_M query rows, BLOCK_N keys per step,
# BLOCK_M % BLOCK_N == 0. dkdv: BLOCK_N key rows owned, BLOCK_M query rows per step,
# BLOCK_N % BLOCK_M == 0. wgmma (sm_90) needs the dot's M >= 64: the query rows for fwd / dq, the
# key rows for dkdv (it computes K Q^T). Every entry is one the compile gate
# (llmstack/kernels/compile_check.py, `make compile-check`) found spill-free and within shared
# memory at the 1B / 8B shapes, with and without packed documents; dkdv holds dK and dV in fp32
# registers, which at head dim 128 on sm_90 leaves room for 16 query rows per step only, and at
# head dim 256 on sm_90 spills 28-116 B in every shape tried (waived and shown by the gate).
CONFIGS = {
    "fwd": {
        ("sm90", 16, 64): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 4)],
        ("sm90", 16, 128): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        ("sm90", 16, 256): [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
        ("sm80", 16, 64): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 4)],
        ("sm80", 16, 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        ("sm80", 16, 256): [(64, 32, 8, 3), (64, 16, 4, 3)],
        ("any", 32, 64): [(32, 32, 4, 2), (32, 16, 4, 2)],
        ("any", 32, 128): [(32, 16, 4, 2), (32, 32, 4, 1)],
        ("any", 32, 256): [(32, 16, 4, 2)],
    },
    "dkdv": {
        ("sm90", 16, 64): [(64, 128, 8, 2), (32, 128, 8, 3), (16, 64, 4, 3)],
        ("sm90", 16, 128): [(16, 128, 8, 2), (16, 64, 8, 3)],
        ("sm90", 16, 256): [(16, 64, 8, 2)],
        ("sm80", 16, 64): [(16, 128, 8, 3), (16, 64, 4, 3)],
        ("sm80", 16, 128): [(32, 64, 8, 3), (16, 64, 8, 3), (16, 32, 4, 3)],
        ("sm80", 16, 256): [(16, 64, 8, 2)],
        ("any", 32, 64): [(32, 32, 4, 2), (16, 32, 4, 2)],
        ("any", 32, 128): [(16, 32, 4, 2)],
        ("any", 32, 256): [(16, 32, 4, 2)],
    },
    "dq": {
        ("sm90", 16, 64): [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)],
        ("sm90", 16, 128): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
        ("sm90", 16, 256): [(128, 32, 8, 3), (128, 32, 8, 2)],
        ("sm80", 16, 64): [(128, 32, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3)],
        ("sm80", 16, 128): [(128, 32, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3)],
        ("sm80", 16, 256): [(64, 32, 8, 3), (64, 16, 4, 3), (32, 32, 4, 3)],
        ("any", 32, 64): [(32, 32, 4, 2), (32, 16, 4, 2)],
        ("any", 32, 128): [(32, 16, 4, 2), (32, 32, 4, 2)],
        ("any", 32, 256): [(32, 16, 4, 2), (32, 16, 4, 1)],
    },
}
# one config each under the interpreter: unequal blocks (the diagonal split with BLOCK_M != BLOCK_N)
INTERPRET_CONFIGS = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}


def _family() -> str:
    return "sm90" if triton.runtime.driver.active.get_current_target().arch >= 90 else "sm80"


def config_shapes(kernel: str, dtype: torch.dtype, block_d: int) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, warps, stages) the autotuner may pick for this kernel, operand
    dtype and padded head dim on the current GPU."""
    key = ("any", 32) if dtype == torch.float32 else (_family(), 16)
    return CONFIGS[kernel][key + (max(64, block_d),)]


def _tma_blocks(nargs):
    """Config pre-hook: the TMA descriptors' block shapes follow the config's tile sizes."""
    if TensorDescriptor is not None and isinstance(nargs["Q"], TensorDescriptor):
        d = nargs["BLOCK_D"]
        nargs["Q"].block_shape = [1, nargs["BLOCK_M"], d]
        nargs["K"].block_shape = [1, nargs["BLOCK_N"], d]
        nargs["V"].block_shape = [1, nargs["BLOCK_N"], d]


def _autotune_configs(kernel: str) -> list[triton.Config]:
    # read when the kernel is defined, as triton.jit decides interpreted-or-compiled then
    if triton_interpreting():
        shapes = [INTERPRET_CONFIGS[kernel]]
    else:
        shapes = sorted({c for cs in CONFIGS[kernel].values() for c in cs})
    hook = _tma_blocks if kernel == "fwd" else None
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=hook)
            for m, n, w, s in shapes]


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        q = q.base if TensorDescriptor is not None and isinstance(q, TensorDescriptor) else q
        want = set(config_shapes(kernel, q.dtype, kwargs["BLOCK_D"]))
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in want]
    return {"early_config_prune": prune}


def _even_t(args) -> bool:
    return args["T"] % args["BLOCK_M"] == 0 and args["T"] % args["BLOCK_N"] == 0


_KEY = ["T", "BLOCK_D", "CAUSAL", "HAS_DOC"]


# --------------------------------------------------------------------------------------------
# tile helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(ptrs, t_ok, d_ok, CHECK_T: tl.constexpr, CHECK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Load with only the bounds masks the specialisation needs (t_ok / d_ok broadcast to ptrs)."""
    if CHECK_T and CHECK_D:
        x = tl.load(ptrs, mask=t_ok & d_ok, other=0.0)
    elif CHECK_T:
        x = tl.load(ptrs, mask=t_ok, other=0.0)
    elif CHECK_D:
        x = tl.load(ptrs, mask=d_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_rows(base, rows, offs_d, stride, T, D, CHECK_T: tl.constexpr, CHECK_D: tl.constexpr,
               UPCAST: tl.constexpr):
    """[len(rows), BLOCK_D] tile of a [T, D] row-major (stride, 1) matrix."""
    return _load_tile(base + rows[:, None] * stride + offs_d[None, :], rows[:, None] < T, offs_d[None, :] < D,
                      CHECK_T, CHECK_D, UPCAST)


@triton.jit
def _load_cols(base, rows, offs_d, stride, T, D, CHECK_T: tl.constexpr, CHECK_D: tl.constexpr,
               UPCAST: tl.constexpr):
    """The same tile transposed, [BLOCK_D, len(rows)], read straight from memory."""
    return _load_tile(base + offs_d[:, None] + rows[None, :] * stride, rows[None, :] < T, offs_d[:, None] < D,
                      CHECK_T, CHECK_D, UPCAST)


@triton.jit
def _store_tile(ptrs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=mask)
    else:
        tl.store(ptrs, x)


@triton.jit
def _query_ranges(start_m, T, BOUNDS, HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Causal key ranges of the query block at start_m: [lo, mid) document-masked, [mid, start_m)
    unmasked (then the diagonal). BOUNDS points at this batch row's document starts."""
    lo = 0
    mid = 0
    if HAS_DOC:
        first = tl.load(BOUNDS + start_m)
        last = tl.load(BOUNDS + tl.minimum(start_m + BLOCK_M, T) - 1)
        mono = first >= 0
        lo = tl.where(mono, (first // BLOCK_N) * BLOCK_N, 0)
        mid = tl.where(mono, tl.minimum(tl.cdiv(last, BLOCK_N) * BLOCK_N, start_m), start_m)
    return lo, mid


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_steps(acc, l_i, m_i, q, k_base, v_base, tma_b, tma_col, doc_base, doc_m, offs_m, offs_d, skt, svt, sdt, T, D,
               qk_scale, lo, hi, CAUSAL_MASK: tl.constexpr, DOC_MASK: tl.constexpr, KEY_BOUND: tl.constexpr,
               CHECK_T: tl.constexpr, CHECK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
               TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """k_base / v_base: pointers at this (batch, kv head), or with TMA the [B, T, Hkv*D] tensor
    descriptors read at (tma_b, key, tma_col); TMA zero-fills rows past T."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            kT = tl.trans(k_base.load([tma_b, start_n, tma_col]).reshape(BLOCK_N, BLOCK_D))
            v = v_base.load([tma_b, start_n, tma_col]).reshape(BLOCK_N, BLOCK_D)
        else:
            kT = _load_cols(k_base, offs_n, offs_d, skt, T, D, CHECK_T, CHECK_D, UPCAST)
            v = _load_rows(v_base, offs_n, offs_d, svt, T, D, CHECK_T, CHECK_D, UPCAST)
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
        if CAUSAL_MASK:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        if KEY_BOUND:
            s = tl.where(offs_n[None, :] < T, s, float("-inf"))
        if DOC_MASK:
            doc_n = tl.load(doc_base + offs_n * sdt, mask=offs_n < T, other=-1)
            s = tl.where(doc_m[:, None] == doc_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_autotune_configs("fwd"), key=_KEY + ["TMA"], prune_configs_by=_pruner("fwd"))
@triton.heuristics({"EVEN_T": _even_t})
@triton.jit
def attn_fwd(
    Q, K, V, O, LSE, DOC, BOUNDS,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, sdb, sdt,
    T, H, D, GROUP, qk_scale,  # qk_scale = softmax scale * log2(e)
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    EVEN_D: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, EVEN_T: tl.constexpr,
):
    """TMA (sm_90+, 16-bit, EVEN_D, heads packed in each row): Q, K, V are [B, T, heads*D] tensor
    descriptors (blocks [1, BLOCK_M or BLOCK_N, D], set per config by `_tma_blocks`), else pointers."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b32 = pid_bh // H
    h32 = pid_bh % H
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    CHECK_D: tl.constexpr = not EVEN_D
    CHECK_T: tl.constexpr = not EVEN_T

    tma_col = (h32 // GROUP) * D
    if TMA:
        q = Q.load([b32, start_m, h32 * D]).reshape(BLOCK_M, BLOCK_D)
        k_base = K
        v_base = V
    else:
        q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqt, T, D, CHECK_T, CHECK_D, UPCAST)
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
    if CAUSAL:
        lo, mid = _query_ranges(start_m, T, BOUNDS + b * 2 * T, HAS_DOC, BLOCK_M, BLOCK_N)
        if HAS_DOC:
            acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, b32, tma_col, doc_base, doc_m, offs_m, offs_d,
                                       skt, svt, sdt, T, D, qk_scale, lo, mid, False, True, False, False, CHECK_D,
                                       UPCAST, DOT_PREC, TMA, BLOCK_N, BLOCK_D)
        acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, b32, tma_col, doc_base, doc_m, offs_m, offs_d,
                                   skt, svt, sdt, T, D, qk_scale, mid, start_m, False, False, False, False, CHECK_D,
                                   UPCAST, DOT_PREC, TMA, BLOCK_N, BLOCK_D)
        acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, b32, tma_col, doc_base, doc_m, offs_m, offs_d,
                                   skt, svt, sdt, T, D, qk_scale, start_m, tl.minimum(start_m + BLOCK_M, T), True,
                                   HAS_DOC, False, CHECK_T, CHECK_D, UPCAST, DOT_PREC, TMA, BLOCK_N, BLOCK_D)
    else:
        full = (T // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, b32, tma_col, doc_base, doc_m, offs_m, offs_d,
                                   skt, svt, sdt, T, D, qk_scale, 0, full, False, HAS_DOC, False, False, CHECK_D,
                                   UPCAST, DOT_PREC, TMA, BLOCK_N, BLOCK_D)
        if not EVEN_T:
            acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, b32, tma_col, doc_base, doc_m, offs_m,
                                       offs_d, skt, svt, sdt, T, D, qk_scale, full, T, False, HAS_DOC, True, True,
                                       CHECK_D, UPCAST, DOT_PREC, TMA, BLOCK_N, BLOCK_D)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows beyond T (not stored) have no allowed key
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    if CHECK_T or CHECK_D:
        tl.store(o_ptrs, out, mask=(offs_m[:, None] < T) & (offs_d[None, :] < D))
    else:
        tl.store(o_ptrs, out)
    lse_ptrs = LSE + pid_bh.to(tl.int64) * T + offs_m
    if CHECK_T:
        tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=offs_m < T)
    else:
        tl.store(lse_ptrs, m_i + tl.log2(l_i))


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

@triton.jit
def bwd_preprocess(O, DO, DELTA, sob, sot, soh, sdob, sdot, sdoh, T, H, D,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, t] = sum_d dO * O (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh, offs_m, offs_d, sot, T, D, True, True, True)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, offs_d, sdot, T, D, True, True, True)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_n, offs_n, offs_d, sqt, sdot,
                sdt, T, D, qk_scale, lo, hi, CAUSAL_MASK: tl.constexpr, DOC_MASK: tl.constexpr,
                CHECK_T: tl.constexpr, CHECK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                WANT_DK: tl.constexpr, WANT_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    # Query rows past T load as zeros with lse = delta = 0: their P^T column is 1 but dO and Q
    # are 0, so they add nothing to dV or dK and need no mask.
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT = _load_cols(q_base, offs_m, offs_d, sqt, T, D, CHECK_T, CHECK_D, UPCAST)
        do = _load_rows(do_base, offs_m, offs_d, sdot, T, D, CHECK_T, CHECK_D, UPCAST)
        if CHECK_T:
            lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
        sT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale           # [BLOCK_N, BLOCK_M]
        pT = tl.exp2(sT - lse[None, :])
        if CAUSAL_MASK:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        if DOC_MASK:
            doc_m = tl.load(doc_base + offs_m * sdt, mask=offs_m < T, other=-2)
            pT = tl.where(doc_n[:, None] == doc_m[None, :], pT, 0.0)
        if WANT_DV:
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        if WANT_DK:
            if CHECK_T:
                delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
            else:
                delta = tl.load(delta_base + offs_m)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)        # [BLOCK_N, BLOCK_M]
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_heads(dk, dv, k, v, Q, DO, LSE, DELTA, doc_base, doc_n, offs_n, offs_d, b, hk, start_n, diag, mid, hi,
                sqb, sqt, sqh, sdob, sdot, sdoh, sdt, T, H, D, GROUP, qk_scale, CAUSAL: tl.constexpr,
                HAS_DOC: tl.constexpr, EVEN_T: tl.constexpr, CHECK_D: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PREC: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK and/or dV of one key block summed over the GROUP query heads of its kv head."""
    CHECK_T: tl.constexpr = not EVEN_T
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        lse_base = LSE + (b * H + h) * T
        delta_base = DELTA + (b * H + h) * T
        if CAUSAL:
            dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_n, offs_n, offs_d,
                                 sqt, sdot, sdt, T, D, qk_scale, start_n, diag, True, HAS_DOC, CHECK_T, CHECK_D,
                                 UPCAST, DOT_PREC, WANT_DK, WANT_DV, BLOCK_M)
            dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_n, offs_n, offs_d,
                                 sqt, sdot, sdt, T, D, qk_scale, diag, mid, False, False, False, CHECK_D, UPCAST,
                                 DOT_PREC, WANT_DK, WANT_DV, BLOCK_M)
            dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_n, offs_n, offs_d,
                                 sqt, sdot, sdt, T, D, qk_scale, mid, hi, False, HAS_DOC, CHECK_T, CHECK_D, UPCAST,
                                 DOT_PREC, WANT_DK, WANT_DV, BLOCK_M)
        else:
            full = (T // BLOCK_M) * BLOCK_M
            dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_n, offs_n, offs_d,
                                 sqt, sdot, sdt, T, D, qk_scale, 0, full, False, HAS_DOC, False, CHECK_D, UPCAST,
                                 DOT_PREC, WANT_DK, WANT_DV, BLOCK_M)
            if not EVEN_T:
                dk, dv = _dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_n, offs_n,
                                     offs_d, sqt, sdot, sdt, T, D, qk_scale, full, T, False, HAS_DOC, True, CHECK_D,
                                     UPCAST, DOT_PREC, WANT_DK, WANT_DV, BLOCK_M)
    return dk, dv


@triton.autotune(configs=_autotune_configs("dkdv"), key=_KEY, prune_configs_by=_pruner("dkdv"))
@triton.heuristics({"EVEN_T": _even_t})
@triton.jit
def bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, BOUNDS,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
    sdkb, sdkt, sdkh, sdvb, sdvt, sdvh, sdb, sdt,
    T, H, Hkv, D, GROUP, scale, qk_scale,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """One program = one key block of one kv head; GQA: sums the GROUP query heads sharing it in
    fp32 registers (deterministic, no per-query-head buffer)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    CHECK_D: tl.constexpr = not EVEN_D
    CHECK_T: tl.constexpr = not EVEN_T

    k = _load_rows(K + b * skb + hk * skh, offs_n, offs_d, skt, T, D, CHECK_T, CHECK_D, UPCAST)
    v = _load_rows(V + b * svb + hk * svh, offs_n, offs_d, svt, T, D, CHECK_T, CHECK_D, UPCAST)
    doc_base = DOC + b * sdb
    doc_n = offs_n
    if HAS_DOC:
        doc_n = tl.load(doc_base + offs_n * sdt, mask=offs_n < T, other=-1)
    # causal query blocks: [start_n, diag) the diagonal (causal mask), [diag, mid) unmasked,
    # [mid, hi) document-masked; past hi no query row shares a document with these keys
    diag = 0
    mid = 0
    hi = T
    if CAUSAL:
        diag = tl.minimum(start_n + BLOCK_N, T)
        mid = tl.maximum((T // BLOCK_M) * BLOCK_M, diag)
        if HAS_DOC:
            ends = BOUNDS + b * 2 * T + T                      # row 1 of bounds: document ends
            end_first = tl.load(ends + start_n)
            end_last = tl.load(ends + diag - 1)
            mono = end_first >= 0
            mid = tl.where(mono, tl.maximum((end_first // BLOCK_M) * BLOCK_M, diag), diag)
            hi = tl.where(mono, end_last, T)

    dk_ptrs = DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :]
    dv_ptrs = DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :]
    store_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    # Head dim > 128: dV, then dK, in two sweeps over the queries (S^T recomputed once more),
    # because two [BLOCK_N, BLOCK_D] fp32 accumulators do not fit the register file.
    TWO_PASS: tl.constexpr = BLOCK_D > 128
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if TWO_PASS:
        # each sweep carries only its own accumulator; `idle` stands in for the other one
        idle = tl.zeros([16, 16], dtype=tl.float32)
        idle, dv = _dkdv_heads(idle, dv, k, v, Q, DO, LSE, DELTA, doc_base, doc_n, offs_n, offs_d, b, hk, start_n, diag,
                               mid, hi, sqb, sqt, sqh, sdob, sdot, sdoh, sdt, T, H, D, GROUP, qk_scale, CAUSAL, HAS_DOC,
                               EVEN_T, CHECK_D, UPCAST, DOT_PREC, False, True, BLOCK_M)
        _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), store_mask, CHECK_T or CHECK_D)
        dk, idle = _dkdv_heads(dk, idle, k, v, Q, DO, LSE, DELTA, doc_base, doc_n, offs_n, offs_d, b, hk, start_n, diag,
                               mid, hi, sqb, sqt, sqh, sdob, sdot, sdoh, sdt, T, H, D, GROUP, qk_scale, CAUSAL, HAS_DOC,
                               EVEN_T, CHECK_D, UPCAST, DOT_PREC, True, False, BLOCK_M)
    else:
        dk, dv = _dkdv_heads(dk, dv, k, v, Q, DO, LSE, DELTA, doc_base, doc_n, offs_n, offs_d, b, hk, start_n, diag,
                             mid, hi, sqb, sqt, sqh, sdob, sdot, sdoh, sdt, T, H, D, GROUP, qk_scale, CAUSAL, HAS_DOC,
                             EVEN_T, CHECK_D, UPCAST, DOT_PREC, True, True, BLOCK_M)
        _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), store_mask, CHECK_T or CHECK_D)
    _store_tile(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), store_mask, CHECK_T or CHECK_D)


@triton.jit
def _dq_steps(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_m, offs_m, offs_d, skt, svt, sdt, T, D, qk_scale,
              lo, hi, CAUSAL_MASK: tl.constexpr, DOC_MASK: tl.constexpr, KEY_BOUND: tl.constexpr,
              CHECK_T: tl.constexpr, CHECK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _load_cols(k_base, offs_n, offs_d, skt, T, D, CHECK_T, CHECK_D, UPCAST)
        vT = _load_cols(v_base, offs_n, offs_d, svt, T, D, CHECK_T, CHECK_D, UPCAST)
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
        if KEY_BOUND:
            p = tl.where(offs_n[None, :] < T, p, 0.0)
        if DOC_MASK:
            doc_n = tl.load(doc_base + offs_n * sdt, mask=offs_n < T, other=-1)
            p = tl.where(doc_m[:, None] == doc_n[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_autotune_configs("dq"), key=_KEY, prune_configs_by=_pruner("dq"))
@triton.heuristics({"EVEN_T": _even_t})
@triton.jit
def bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, BOUNDS,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sdb, sdt,
    T, H, D, GROUP, scale, qk_scale,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    """One program = one query block of one query head; loops over key blocks (no atomics)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    CHECK_D: tl.constexpr = not EVEN_D
    CHECK_T: tl.constexpr = not EVEN_T

    q = _load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqt, T, D, CHECK_T, CHECK_D, UPCAST)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, offs_d, sdot, T, D, CHECK_T, CHECK_D, UPCAST)
    row = pid_bh.to(tl.int64) * T
    if CHECK_T:
        lse = tl.load(LSE + row + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + row + offs_m, mask=offs_m < T, other=0.0)
    else:
        lse = tl.load(LSE + row + offs_m)
        delta = tl.load(DELTA + row + offs_m)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    doc_base = DOC + b * sdb
    doc_m = offs_m
    if HAS_DOC:
        doc_m = tl.load(doc_base + offs_m * sdt, mask=offs_m < T, other=-2)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        lo, mid = _query_ranges(start_m, T, BOUNDS + b * 2 * T, HAS_DOC, BLOCK_M, BLOCK_N)
        if HAS_DOC:
            dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_m, offs_m, offs_d, skt, svt, sdt, T,
                           D, qk_scale, lo, mid, False, True, False, False, CHECK_D, UPCAST, DOT_PREC, BLOCK_N)
        dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_m, offs_m, offs_d, skt, svt, sdt, T, D,
                       qk_scale, mid, start_m, False, False, False, False, CHECK_D, UPCAST, DOT_PREC, BLOCK_N)
        dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_m, offs_m, offs_d, skt, svt, sdt, T, D,
                       qk_scale, start_m, tl.minimum(start_m + BLOCK_M, T), True, HAS_DOC, False, CHECK_T, CHECK_D,
                       UPCAST, DOT_PREC, BLOCK_N)
    else:
        full = (T // BLOCK_N) * BLOCK_N
        dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_m, offs_m, offs_d, skt, svt, sdt, T, D,
                       qk_scale, 0, full, False, HAS_DOC, False, False, CHECK_D, UPCAST, DOT_PREC, BLOCK_N)
        if not EVEN_T:
            dq = _dq_steps(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_m, offs_m, offs_d, skt, svt, sdt, T,
                           D, qk_scale, full, T, False, HAS_DOC, True, True, CHECK_D, UPCAST, DOT_PREC, BLOCK_N)

    dq = (dq * scale).to(DQ.dtype.element_ty)
    dq_ptrs = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :]
    if CHECK_T or CHECK_D:
        tl.store(dq_ptrs, dq, mask=(offs_m[:, None] < T) & (offs_d[None, :] < D))
    else:
        tl.store(dq_ptrs, dq)
