"""Weight-only quantized matmul: y = x @ dequant(W).T for int8 and packed int4 weights.

Storage formats (shared by `llmstack.quant`):

- int8, per output channel, symmetric: `qweight` int8 [N, K], `scales` [N]; W[n, k] = q * s[n].
- int4, group-wise along K, asymmetric: `qweight` uint8 [N, ceil(K/2)] with two values per byte
  (k = 2j in the low nibble, k = 2j + 1 in the high nibble), `scales` and `zeros` [N, ceil(K/G)]
  (zeros are integer zero points 0..15 stored as uint8); W[n, k] = (q - z[n, k//G]) * s[n, k//G].
  K need not be a multiple of G: the last group is partial.

Implementations, one signature each:
- `*_reference`: dequantize to fp32 and matmul (tests);
- `*_torch`: dequantize to x's dtype and matmul (the CPU path);
- `*_triton`: the kernels below, two designs chosen by M:
  * M <= 4 (decode): split-K GEMV. Batch-1 decode is a stream of the weights, so the grid is
    (column blocks, K splits), sized to give every SM several programs; each program reads a
    [BLOCK_N, K / splits] slab of the quantized weights once, multiplies the integer values
    (converted, not dequantized) with x on CUDA cores (no tl.dot: M is 1-4 rows) and applies the
    scale after the dot, once per output and K step: int4 group g contributes
    s * (sum_k q x - z * sum_k x), int8 s * sum_k q x. The fp32 partial sums of the splits are
    added by one small reduction (deterministic, no atomics).
  * M > 4: a [BLOCK_M, BLOCK_N] tile of y per program, streaming K in BLOCK_K steps; the weight
    tile is dequantized in registers (int4: the low and high nibbles multiply the even and odd
    columns of x, so no interleave is needed) and fed to tl.dot with fp32 accumulation. M <= 16
    uses BLOCK_M = 16, the smallest tl.dot tile; prefill shapes use 64.
  BLOCK_K divides G in both, so a K step never straddles two int4 groups.

`dequant_matmul(x, qweight, scales, zeros, *, bits, group_size, in_features, backend)` is the public
entry. On a GPU that lacks what a kernel needs, `check_gpu_support` raises a one-line error naming
the torch fallback (`backend="torch"`) instead of failing inside the compiler.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmstack.errors import UserError
from llmstack.kernels import triton_interpreting


class QuantKernelUnavailable(UserError):
    pass



# --- int4 packing --------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> uint8 [N, ceil(K/2)], even k in the low nibble."""
    N, K = q.shape
    if K % 2:
        q = torch.cat([q, torch.zeros(N, 1, dtype=q.dtype, device=q.device)], dim=1)
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> uint8 values 0..15 [N, K]."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def dequantize_int8(qweight, scales, dtype=torch.float32) -> torch.Tensor:
    return qweight.to(dtype) * scales.to(dtype)[:, None]


def dequantize_int4(qweight, scales, zeros, *, group_size: int, in_features: int, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(qweight, in_features).to(dtype)
    s = scales.to(dtype).repeat_interleave(group_size, dim=1)[:, :in_features]
    z = zeros.to(dtype).repeat_interleave(group_size, dim=1)[:, :in_features]
    return (q - z) * s


# --- reference and torch paths -----------------------------------------------------------------

def int8_matmul_reference(x, qweight, scales):
    return (x.float() @ dequantize_int8(qweight, scales).t()).to(x.dtype)


def int8_matmul_torch(x, qweight, scales):
    # scale after the matmul: one [M, N] multiply instead of an [N, K] one
    return (x @ qweight.to(x.dtype).t()) * scales.to(x.dtype)


def int4_matmul_reference(x, qweight, scales, zeros, *, group_size: int, in_features: int):
    w = dequantize_int4(qweight, scales, zeros, group_size=group_size, in_features=in_features)
    return (x.float() @ w.t()).to(x.dtype)


def int4_matmul_torch(x, qweight, scales, zeros, *, group_size: int, in_features: int):
    return x @ dequantize_int4(qweight, scales, zeros, group_size=group_size, in_features=in_features, dtype=x.dtype).t()


# --- Triton kernels ------------------------------------------------------------------------------

@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        if IEEE:  # fp32 activations: no TF32 rounding on GPU
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
        else:  # int8 values are exact in fp16/bf16
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = acc * s[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_wn, stride_sn,
                        stride_ym, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    m_ok, n_ok = rm < M, rn < N
    k_half = (K + 1) // 2
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + rj  # byte index inside the packed row
        packed = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + j[None, :],
                         mask=n_ok[:, None] & (j < k_half)[None, :], other=0)
        g = k0 // group_size
        s = tl.load(s_ptr + rn.to(tl.int64) * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn.to(tl.int64) * stride_sn + g, mask=n_ok, other=0).to(tl.float32)
        w_lo = ((packed & 0xF).to(tl.float32) - z[:, None]) * s[:, None]
        w_hi = ((packed >> 4).to(tl.float32) - z[:, None]) * s[:, None]
        k_even = 2 * j
        x_lo = tl.load(x_row + k_even[None, :], mask=m_ok[:, None] & (k_even < K)[None, :], other=0.0)
        x_hi = tl.load(x_row + k_even[None, :] + 1, mask=m_ok[:, None] & (k_even + 1 < K)[None, :], other=0.0)
        if UPCAST:
            x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
        if IEEE:
            acc += tl.dot(x_lo, tl.trans(w_lo), input_precision="ieee")
            acc += tl.dot(x_hi, tl.trans(w_hi), input_precision="ieee")
        else:
            acc += tl.dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)))
            acc += tl.dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)))
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, p_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_ps, stride_pm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + rk
        k_ok = k < k_hi
        q = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
        xs = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm < M)[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            x = tl.sum(tl.where(rm[:, None] == m, xs, 0.0), axis=0)  # row m of the (1-4 row) x tile
            part = tl.sum(q * x[None, :], axis=1)
            acc += tl.where(rm[:, None] == m, part[None, :], 0.0)
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(p_ptr + pid_s * stride_ps + rm[:, None] * stride_pm + rn[None, :], acc * s[None, :],
             mask=(rm < M)[:, None] & n_ok[None, :])


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, p_ptr, M, N, K, group_size, k_per_split, stride_xm, stride_wn,
                      stride_sn, stride_ps, stride_pm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    k_half = (K + 1) // 2
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    sz_rows = rn.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        j = k0 // 2 + rj  # byte index inside the packed row
        packed = tl.load(w_rows + j[None, :], mask=n_ok[:, None] & (j < k_half)[None, :], other=0)
        q_lo = (packed & 0xF).to(tl.float32)
        q_hi = (packed >> 4).to(tl.float32)
        g = k0 // group_size
        s = tl.load(s_ptr + sz_rows + g, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_rows + g, mask=n_ok, other=0).to(tl.float32)
        k_even = 2 * j
        x_rows = x_ptr + rm[:, None] * stride_xm + k_even[None, :]
        m_ok = (rm < M)[:, None]
        xs_lo = tl.load(x_rows, mask=m_ok & (k_even < k_hi)[None, :], other=0.0).to(tl.float32)
        xs_hi = tl.load(x_rows + 1, mask=m_ok & (k_even + 1 < k_hi)[None, :], other=0.0).to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            x_lo = tl.sum(tl.where(rm[:, None] == m, xs_lo, 0.0), axis=0)  # row m of the x tile
            x_hi = tl.sum(tl.where(rm[:, None] == m, xs_hi, 0.0), axis=0)
            # sum_k (q - z) s x = s (sum_k q x - z sum_k x): the group's scale after the dot
            dot = tl.sum(q_lo * x_lo[None, :] + q_hi * x_hi[None, :], axis=1)
            part = s * (dot - z * (tl.sum(x_lo, axis=0) + tl.sum(x_hi, axis=0)))
            acc += tl.where(rm[:, None] == m, part[None, :], 0.0)
    tl.store(p_ptr + pid_s * stride_ps + rm[:, None] * stride_pm + rn[None, :], acc,
             mask=(rm < M)[:, None] & n_ok[None, :])


GEMV_MAX_M = 4
_GEMV_BLOCK_N = 64


def _gemv_splits(N: int, K: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(K splits, K per split, a multiple of block_k): enough programs for ~4 per SM on a GPU."""
    n_blocks = triton.cdiv(N, _GEMV_BLOCK_N)
    k_steps = triton.cdiv(K, block_k)
    # interpreter: a few programs, still several K splits on the tests' shapes
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    splits = max(1, min(k_steps, triton.cdiv(target, n_blocks)))
    k_per_split = triton.cdiv(k_steps, splits) * block_k
    return triton.cdiv(K, k_per_split), k_per_split


def _gemv_plan(x2: torch.Tensor, N: int, K: int, block_k: int):
    """(fp32 partials [splits, M, N], grid, K per split, launch meta) of a split-K GEMV."""
    M = x2.shape[0]
    splits, k_per_split = _gemv_splits(N, K, block_k, x2.device)
    partials = torch.empty((splits, M, N), dtype=torch.float32, device=x2.device)
    meta = dict(BLOCK_M=triton.next_power_of_2(M), BLOCK_N=_GEMV_BLOCK_N, BLOCK_K=block_k, num_warps=4)
    return partials, (triton.cdiv(N, _GEMV_BLOCK_N), splits), k_per_split, meta


def _blocks(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): decode tiles for M <= 16, square-ish tiles for prefill."""
    if M <= 16:
        return 16, 64, 128
    return 64, 64, 64


def check_gpu_support(device: torch.device, dtype: torch.dtype) -> None:
    """One-line error, naming the fallback, when this GPU cannot run the Triton kernels."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (7, 0):
        raise QuantKernelUnavailable(f"quantized Triton kernels need a GPU of compute capability >= 7.0 (tensor-core "
                                     f"tl.dot); {name} is sm_{major}{minor}: use backend=torch (dequantize + torch matmul)")
    if dtype == torch.bfloat16 and major < 8:
        raise QuantKernelUnavailable(f"quantized Triton kernels with bf16 activations need compute capability >= 8.0; "
                                     f"{name} is sm_{major}{minor}: use fp16 activations or backend=torch")


def _prepare(x: torch.Tensor, what: str) -> tuple[torch.Tensor, tuple]:
    if x.device.type != "cuda" and not triton_interpreting():
        raise QuantKernelUnavailable(f"{what}: the Triton kernel on CPU tensors needs TRITON_INTERPRET=1; use backend=torch")
    check_gpu_support(x.device, x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, lead


def int8_matmul_triton(x, qweight, scales):
    x2, lead = _prepare(x, "int8 dequant-matmul")
    M, K = x2.shape
    N = qweight.shape[0]
    if 0 < M <= GEMV_MAX_M:
        partials, grid, k_per_split, meta = _gemv_plan(x2, N, K, 128)
        _int8_gemv_kernel[grid](x2, qweight, scales, partials, M, N, K, k_per_split, x2.stride(0), qweight.stride(0),
                                partials.stride(0), partials.stride(1), **meta)
        return partials.sum(dim=0).to(x.dtype).reshape(*lead, N)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm, bn, bk = _blocks(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _int8_matmul_kernel[grid](x2, qweight, scales, y, M, N, K, x2.stride(0), qweight.stride(0), y.stride(0),
                              UPCAST=triton_interpreting() or x.dtype == torch.float32,
                              IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y.reshape(*lead, N)


def _int4_block_k(group_size: int, want: int) -> int:
    bk = want
    while bk > 32 and group_size % bk:
        bk //= 2
    if group_size % bk:
        raise QuantKernelUnavailable(f"int4 kernel: group_size {group_size} must be a multiple of 32; use backend=torch")
    return bk


def int4_matmul_triton(x, qweight, scales, zeros, *, group_size: int, in_features: int):
    x2, lead = _prepare(x, "int4 dequant-matmul")
    M, K = x2.shape
    N = qweight.shape[0]
    if 0 < M <= GEMV_MAX_M:
        partials, grid, k_per_split, meta = _gemv_plan(x2, N, K, _int4_block_k(group_size, 128))
        _int4_gemv_kernel[grid](x2, qweight, scales, zeros, partials, M, N, K, group_size, k_per_split, x2.stride(0),
                                qweight.stride(0), scales.stride(0), partials.stride(0), partials.stride(1), **meta)
        return partials.sum(dim=0).to(x.dtype).reshape(*lead, N)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm, bn, bk = _blocks(M)
    bk = _int4_block_k(group_size, bk)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _int4_matmul_kernel[grid](x2, qweight, scales, zeros, y, M, N, K, group_size, x2.stride(0), qweight.stride(0),
                              scales.stride(0), y.stride(0), UPCAST=triton_interpreting() or x.dtype == torch.float32,
                              IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y.reshape(*lead, N)


# --- public entry ----------------------------------------------------------------------------------

def dequant_matmul(x, qweight, scales, zeros=None, *, bits: int, group_size: int = 0, in_features: int,
                   backend: str = "torch"):
    """y = x @ dequant(W).T; backend is "torch" or "triton" (resolved by the caller)."""
    if bits == 8:
        fn = int8_matmul_triton if backend == "triton" else int8_matmul_torch
        return fn(x, qweight, scales)
    if bits == 4:
        fn = int4_matmul_triton if backend == "triton" else int4_matmul_torch
        return fn(x, qweight, scales, zeros, group_size=group_size, in_features=in_features)
    raise ValueError(f"dequant_matmul: bits must be 8 or 4, got {bits}")
