"""SwiGLU elementwise: silu(gate) * up (computed in fp32, stored in the input dtype).

`swiglu_triton(gate, up)` flattens both (same shape, same dtype) and runs `_swiglu_fwd_kernel`
over BLOCK-sized chunks: y = gate * sigmoid(gate) * up in fp32. Nothing but the inputs is
saved; `_swiglu_bwd_kernel` recomputes sigmoid(gate) and writes
d_gate = dy * up * sig * (1 + gate * (1 - sig)) and d_up = dy * silu(gate), in the input dtype.
The backward works on row-strided [M, N] tiles (`swiglu_backward_into`), so the fused gate-up
matmul's backward (matmul.py) has it write d_gate and d_up into the two halves of one buffer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmstack.kernels import triton_interpreting

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_reference(gate, up)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + offs, (g * sig * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, M, N, stride_dy, stride_g, stride_u, stride_dg, stride_du,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # [BLOCK_M, BLOCK_N] tile of row-strided [M, N] operands (last dim contiguous): the gate-up
    # backward writes d_gate and d_up as the two halves of one [M, 2N] buffer
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DG + rows * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)



def _block() -> int:
    return 8192 if triton_interpreting() else 1024  # fewer programs under the interpreter


def swiglu_backward_into(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, d_gate: torch.Tensor,
                         d_up: torch.Tensor) -> None:
    """d_gate, d_up (preallocated [M, N] views, rows strided, last dim contiguous) from dy, gate,
    up [M, N]: one fused kernel, fp32 math, stores in d_gate's / d_up's dtype."""
    M, N = gate.shape
    ts = (dy, gate, up, d_gate, d_up)
    if any(t.shape != (M, N) for t in ts) or any(N > 1 and t.stride(1) != 1 for t in (d_gate, d_up)):
        raise ValueError("swiglu backward: [M, N] operands, outputs with a contiguous last dim, expected; got "
                         + ", ".join(f"{tuple(t.shape)}/{t.stride()}" for t in ts))
    # inputs may be any view (an expanded grad_output has stride 0): copy those whose last dim is strided
    dy, gate, up = (t if t.stride(1) == 1 else t.contiguous() for t in (dy, gate, up))
    if M == 0 or N == 0:
        return
    block_n = min(triton.next_power_of_2(N), _block())
    block_m = max(1, _block() // block_n)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _swiglu_bwd_kernel[grid](dy, gate, up, d_gate, d_up, M, N, dy.stride(0), gate.stride(0), up.stride(0),
                             d_gate.stride(0), d_up.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        n = g.numel()
        if n:
            block = _block()
            _swiglu_fwd_kernel[(triton.cdiv(n, block),)](g, u, y, n, BLOCK=block, num_warps=4)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        if g.numel():
            N = g.shape[-1]
            swiglu_backward_into(dy.view(-1, N), g.view(-1, N), u.view(-1, N), dg.view(-1, N), du.view(-1, N))
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with Triton kernels (fp32 math, output in the input dtype)."""
    for name, t in (("gate", gate), ("up", up)):
        if t.device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(f"swiglu_triton: {name} on {t.device.type} needs TRITON_INTERPRET=1 "
                               "(Triton interpreter); use the torch backend instead")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"swiglu_triton: gate and up must match in shape, dtype and device; got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} vs {tuple(up.shape)} {up.dtype} {up.device}")
    if gate.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"swiglu_triton: dtype {gate.dtype} unsupported (float32, float16, bfloat16)")
    return _SwiGLUFunction.apply(gate, up)
