"""SwiGLU elementwise: silu(gate) * up (computed in fp32, stored in the input dtype).

`swiglu_triton(gate, up)` flattens both (same shape, same dtype) and runs `_swiglu_fwd_kernel`
over BLOCK-sized chunks: y = gate * sigmoid(gate) * up in fp32. Nothing but the inputs is
saved; `_swiglu_bwd_kernel` recomputes sigmoid(gate) and writes
d_gate = dy * up * sig * (1 + gate * (1 - sig)) and d_up = dy * silu(gate), in the input dtype.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block() -> int:
    return 8192 if _interpreting() else 1024  # fewer programs under the interpreter


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
        n = g.numel()
        if n:
            block = _block()
            _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dy, g, u, dg, du, n, BLOCK=block, num_warps=4)
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with Triton kernels (fp32 math, output in the input dtype)."""
    for name, t in (("gate", gate), ("up", up)):
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"swiglu_triton: {name} on {t.device.type} needs TRITON_INTERPRET=1 "
                               "(Triton interpreter); use the torch backend instead")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"swiglu_triton: gate and up must match in shape, dtype and device; got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} vs {tuple(up.shape)} {up.dtype} {up.device}")
    if gate.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"swiglu_triton: dtype {gate.dtype} unsupported (float32, float16, bfloat16)")
    return _SwiGLUFunction.apply(gate, up)
