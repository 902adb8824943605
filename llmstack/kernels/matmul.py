"""Matmul with fused epilogue. The model uses it for the SwiGLU gate-up projection:
silu(x @ w_gate.T) * (x @ w_up.T) in one pass over x.

`_matmul_kernel` is a tiled GEMM computing C = A @ B where B is addressed through strides as
the [N, K] "weight" layout (so C = a @ b_t.T); any operand may be a transposed view, which is
how the backward reuses the same kernel. Tiles are visited in grouped order (GROUP_M row-tiles
share a band of B columns, so B tiles stay in L2), the dot accumulates in fp32 and the epilogue
runs on the fp32 accumulator before one store:

    out = act(A @ B + bias) + residual            (act: none | silu | gelu-tanh)
    out = silu(A @ Bg) * (A @ Bu)                  (SWIGLU: two accumulators, one pass over A)

Public functions:
- `matmul_triton(a, b_t, *, bias=None, activation=None, residual=None)`: a [..., K], b_t [N, K].
  Forward only (no autograd); used by the backward below and by benchmarks.
- `gate_up_swiglu_triton(x, w_gate, w_up)`: autograd op. Forward is the fused two-accumulator
  kernel; when a gradient is needed it also stores the two pre-activations (saved instead of
  recomputed: 2 extra GEMMs in backward cost more than 2 [M, H] activations here, and eager
  torch saves the same). Backward: the fused SwiGLU backward kernel (swiglu.py) writes dgate and
  dup side by side into one [M, 2H] buffer (one pass: ~10 bytes per element in bf16), then
  dx = [dgate dup] @ [Wg; Wu] as ONE GEMM over the 2H reduction (`split_b`: the kernel reads Wg,
  then Wu, into one accumulator; no concatenated weight copy) and [dWg; dWu] = [dgate dup].T @ x
  as one [2H, K] GEMM whose row halves are the two gradients — all through `_matmul_kernel` with
  transposed views as operands.

Autotuning: `@triton.autotune` with >= 2 configs cannot run under the Triton interpreter (it
benchmarks on a GPU driver), so the config list is built at import time: one small config
under TRITON_INTERPRET=1, Ampere/Hopper-sized configs otherwise.

Precision notes: bf16 `tl.dot` is wrong under the interpreter (triton issue 11584, bf16 held as
raw uint16 bits), so bf16 operands on CPU raise NotImplementedError instead of returning wrong
numbers; on GPU bf16 is the normal tensor-core path. Epilogue operands (bias, residual) are
upcast to fp32 right after their load, which is correct on both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmstack.kernels import triton_interpreting
from llmstack.kernels.swiglu import swiglu_backward_into


def gate_up_swiglu_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ w_gate.t()) * (x @ w_up.t())


def gate_up_swiglu_torch(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return gate_up_swiglu_reference(x, w_gate, w_up)


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per (GPU generation, operand width, variant):
# "swiglu" keeps two fp32 accumulators and streams two weight tiles, so it gets half the tile area
# of a plain "gemm" (128x256 would need 256 accumulator registers per thread and 245,760 B of
# shared memory at 3 stages); an activation epilogue ("act": silu / gelu-tanh on the accumulator)
# needs room for its temporaries. On sm_80, where mma.sync keeps its operands in registers too,
# only 64-row SwiGLU tiles are spill-free. wgmma (sm_90) needs BLOCK_M >= 64 per warpgroup. Every
# entry is checked by the compile gate (llmstack/kernels/compile_check.py): no spill, within
# shared memory, on wgmma.
_CONFIGS = {
    ("sm90", 16, "swiglu"): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4)],
    ("sm90", 16, "gemm"): [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)],
    ("sm90", 16, "act"): [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4)],
    ("sm80", 16, "swiglu"): [(64, 128, 32, 4, 4), (64, 64, 32, 4, 5)],
    ("sm80", 16, "gemm"): [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 5)],
    ("sm80", 16, "act"): [(128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 5)],
    ("any", 32, "swiglu"): [(64, 32, 32, 4, 3), (64, 64, 16, 4, 3)],
    ("any", 32, "gemm"): [(64, 64, 32, 4, 3), (32, 64, 32, 4, 3)],
    ("any", 32, "act"): [(64, 64, 32, 4, 3), (32, 64, 32, 4, 3)],
    # SPLIT_B (the gate-up backward's dx = [dgate dup] @ [Wg; Wu]): one accumulator like "gemm",
    # but a second pipelined K loop over the other weight
    ("sm90", 16, "split"): [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)],
    ("sm80", 16, "split"): [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 5)],
    ("any", 32, "split"): [(64, 64, 32, 4, 3), (32, 64, 32, 4, 3)],
}


def _configs() -> list[triton.Config]:
    if triton_interpreting():
        # exactly one config: the autotuner then never benchmarks (which needs a GPU driver)
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = sorted({c for cs in _CONFIGS.values() for c in cs})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _prune_configs(configs, named_args, **kwargs):
    """The configs of _CONFIGS for this GPU generation, operand dtype and kernel variant."""
    arch = triton.runtime.driver.active.get_current_target().arch
    width = 32 if named_args["a_ptr"].dtype == torch.float32 else 16
    family = "any" if width == 32 else "sm90" if arch >= 90 else "sm80"
    variant = ("swiglu" if kwargs.get("SWIGLU") else "split" if kwargs.get("SPLIT_B")
               else "act" if kwargs.get("ACTIVATION") else "gemm")
    want = set(_CONFIGS[(family, width, variant)])
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                   c.num_stages) in want]


_ACTIVATIONS = {None: 0, "none": 0, "silu": 1, "gelu": 2, "gelu_tanh": 2}


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    # overflow-free: e = exp(-|x|) in (0, 1]
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(u) = 2 sigmoid(2u) - 1,
    # i.e. x * sigmoid(2u): exp-only, no libdevice (works under the interpreter too).
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * _sigmoid(2.0 * u)


@triton.autotune(configs=_configs(), key=["M", "N", "K", "K2", "SWIGLU", "SPLIT_B", "ACTIVATION"],
                  prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, b2_ptr, c_ptr, bias_ptr, res_ptr, pre1_ptr, pre2_ptr,
                   M, N, K, K2,
                   stride_am, stride_ak, stride_bn, stride_bk, stride_b2n, stride_b2k,
                   stride_cm, stride_cn, stride_rm, stride_rn, stride_pm, stride_pn,
                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   SWIGLU: tl.constexpr, STORE_PRE: tl.constexpr, SPLIT_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ("swizzled") tile order
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak          # [BM, BK]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn          # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU:
        b2_ptrs = b2_ptr + offs_k[:, None] * stride_b2k + offs_n[None, :] * stride_b2n
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        mask_k = offs_k < k_left
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if SWIGLU:
            b2 = tl.load(b2_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
            b2_ptrs += BLOCK_K * stride_b2k
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SPLIT_B:
        # the reduction continues over A's columns [K, K + K2) against the second operand:
        # [A1 A2] @ [B1; B2] in one accumulator, B1 and B2 read from their own tensors
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + (K + offs_k)[None, :] * stride_ak
        b2_ptrs = b2_ptr + offs_k[:, None] * stride_b2k + offs_n[None, :] * stride_b2n
        for k in range(0, tl.cdiv(K2, BLOCK_K)):
            mask_k = offs_k < K2 - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b2_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b2_ptrs += BLOCK_K * stride_b2k

    mask_c = mask_m[:, None] & mask_n[None, :]
    if SWIGLU:
        if STORE_PRE:
            pre_off = offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
            tl.store(pre1_ptr + pre_off, acc.to(pre1_ptr.dtype.element_ty), mask=mask_c)
            tl.store(pre2_ptr + pre_off, acc2.to(pre2_ptr.dtype.element_ty), mask=mask_c)
        acc = acc * _sigmoid(acc) * acc2
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        if ACTIVATION == 1:
            acc = acc * _sigmoid(acc)
        elif ACTIVATION == 2:
            acc = _gelu_tanh(acc)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                      mask=mask_c, other=0.0).to(tl.float32)
        acc = acc + res
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


def _check_device(*ts):
    for t in ts:
        if t is not None and t.device.type != "cuda" and not triton_interpreting():
            raise RuntimeError("llmstack.kernels.matmul: CPU tensors need TRITON_INTERPRET=1 (Triton interpreter)")


def _launch(a2, b_t, *, b2_t=None, split_b=False, bias=None, activation=None, residual=None, pre=None,
            out_dtype=None):
    """a2 [M, K] (any strides), b_t / b2_t [N, K] (any strides) -> out [M, N]. With split_b,
    b_t [N, K1] and b2_t [N, K2] are the two halves of one [N, K1 + K2] operand along the
    reduction dim (out = a2[:, :K1] @ b_t.T + a2[:, K1:] @ b2_t.T, one accumulator)."""
    M, K = a2.shape
    N, K1 = b_t.shape
    K2 = 0
    if split_b:
        K2 = b2_t.shape[1]
        if b2_t.shape[0] != N or K1 + K2 != K:
            raise ValueError(f"matmul_triton: split operand [{N}, {K1}] + {tuple(b2_t.shape)} does not match a [..., {K}]")
        K = K1
    elif K != K1:
        raise ValueError(f"matmul_triton: inner dims differ: a [..., {K}] vs b_t [{N}, {K1}]")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"matmul_triton: activation must be one of None, 'silu', 'gelu', got {activation!r}")
    _check_device(a2, b_t, b2_t, bias, residual)
    if triton_interpreting() and torch.bfloat16 in (a2.dtype, b_t.dtype) and not a2.is_cuda:
        # refuse rather than return wrong numbers (no silent fallback to torch either)
        raise NotImplementedError("matmul_triton: bf16 tl.dot gives wrong results under the Triton interpreter "
                                  "(upstream triton issue 11584); use fp32/fp16 on CPU, bf16 on GPU")
    out = torch.empty((M, N), dtype=out_dtype or a2.dtype, device=a2.device)
    if M == 0 or N == 0:
        return out
    if K + K2 == 0:
        out.zero_()  # fall through to the epilogue with an all-zero accumulator
    swiglu = b2_t is not None and not split_b
    if bias is not None:
        bias = bias.contiguous()
        if bias.shape != (N,):
            raise ValueError(f"matmul_triton: bias [N={N}] expected, got {tuple(bias.shape)}")
    if residual is not None and residual.shape != (M, N):
        raise ValueError(f"matmul_triton: residual [{M}, {N}] expected, got {tuple(residual.shape)}")
    pre1, pre2 = pre if pre is not None else (None, None)
    dummy = out
    b2 = b2_t if b2_t is not None else b_t
    res = residual if residual is not None else dummy
    p1 = pre1 if pre1 is not None else dummy
    p2 = pre2 if pre2 is not None else dummy
    # fp32 operands follow torch's TF32 switch (exact fp32 "ieee" dot by default, like torch.mm);
    # fp16/bf16 operands use the default ("tf32" = plain tensor-core MMA, precision irrelevant).
    fp32_exact = a2.dtype == torch.float32 and not (a2.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    dot_precision = "ieee" if fp32_exact else "tf32"

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _matmul_kernel[grid](
        a2, b_t, b2, out, bias if bias is not None else dummy, res, p1, p2,
        M, N, K, K2,
        a2.stride(0), a2.stride(1), b_t.stride(0), b_t.stride(1), b2.stride(0), b2.stride(1),
        out.stride(0), out.stride(1), res.stride(0), res.stride(1), p1.stride(0), p1.stride(1),
        HAS_BIAS=bias is not None, ACTIVATION=_ACTIVATIONS[activation], HAS_RESIDUAL=residual is not None,
        SWIGLU=swiglu, STORE_PRE=pre is not None, SPLIT_B=split_b, DOT_PRECISION=dot_precision)
    return out


def matmul_triton(a: torch.Tensor, b_t: torch.Tensor, *, bias: torch.Tensor | None = None,
                  activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(a @ b_t.T + bias) + residual in one kernel. a [..., K], b_t [N, K] (the nn.Linear
    weight layout; transposed views are fine), bias [N], residual [..., N]. Output in a's dtype.
    No autograd: callers (the gate-up backward, benchmarks) use it on detached tensors."""
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    res2 = residual.reshape(-1, residual.shape[-1]) if residual is not None else None
    out = _launch(a2, b_t, bias=bias, activation=activation, residual=res2)
    return out.reshape(*lead, b_t.shape[0])


def _gate_up_forward(x2, w_gate, w_up, store_pre: bool):
    M = x2.shape[0]
    H = w_gate.shape[0]
    pre = None
    if store_pre:
        pre = (torch.empty((M, H), dtype=x2.dtype, device=x2.device),
               torch.empty((M, H), dtype=x2.dtype, device=x2.device))
    out = _launch(x2, w_gate, b2_t=w_up, pre=pre)
    return out, pre


class _GateUpSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        need = any(ctx.needs_input_grad)
        out, pre = _gate_up_forward(x2, w_gate, w_up, store_pre=need)
        if need:
            ctx.save_for_backward(x2, w_gate, w_up, pre[0], pre[1])
        ctx.x_shape = x.shape
        return out.reshape(*lead, w_gate.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, w_gate, w_up, g, u = ctx.saved_tensors
        M, H = g.shape
        # dgate | dup side by side in one [M, 2H] buffer, by the fused SwiGLU backward kernel
        d = torch.empty((M, 2 * H), dtype=x2.dtype, device=x2.device)
        swiglu_backward_into(grad_out.reshape(M, H), g, u, d[:, :H], d[:, H:])
        dx = dwg = dwu = None
        if ctx.needs_input_grad[0]:
            # dx = [dgate dup] @ [Wg; Wu]: one GEMM over the 2H reduction, Wg and Wu read in place
            dx = _launch(d, w_gate.t(), b2_t=w_up.t(), split_b=True).reshape(ctx.x_shape)
        need_g, need_u = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if need_g and need_u:
            # [dWg; dWu] = [dgate dup].T @ x in one GEMM; the two gradients are its row halves
            dw = _launch(d.t(), x2.t(), out_dtype=w_gate.dtype)                 # [2H, M] @ [M, K]
            dwg, dwu = dw[:H], dw[H:]
        elif need_g or need_u:
            half = d[:, :H] if need_g else d[:, H:]
            dw = _launch(half.t(), x2.t(), out_dtype=w_gate.dtype)
            dwg, dwu = (dw, None) if need_g else (None, dw)
        return dx, dwg, dwu


def gate_up_swiglu_triton(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """silu(x @ w_gate.T) * (x @ w_up.T) in one kernel (two accumulators, one pass over x).
    x [..., K], w_gate / w_up [H, K]. Under autocast the operands are cast to autocast's dtype
    first (so the weights' gradients come back through that cast, like nn.Linear)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = torch.promote_types(x.dtype, torch.promote_types(w_gate.dtype, w_up.dtype))
    x, w_gate, w_up = x.to(dt), w_gate.to(dt), w_up.to(dt)
    if w_gate.shape != w_up.shape or w_gate.shape[1] != x.shape[-1]:
        raise ValueError(f"gate_up_swiglu: w_gate/w_up [H, {x.shape[-1]}] expected, got {tuple(w_gate.shape)} "
                         f"and {tuple(w_up.shape)}")
    with torch.autocast(device_type=dev, enabled=False):
        return _GateUpSwiGLU.apply(x, w_gate, w_up)
