"""Rotary position embedding on q and k together (half-split "rotate_half" convention, as in
Hugging Face Llama, so checkpoints convert without permuting q/k rows).

q: [B, T, H, D], k: [B, T, Hkv, D]; cos/sin tables: [max_pos, D/2] in fp32;
position_ids: [B, T] (packed sequences restart positions per document) or None for 0..T-1.

`rope_triton` runs one Triton kernel (`_rope_kernel`) that rotates q and k in the same launch:
one program per block of BLOCK_TOK tokens (flattened b, t) loads each token's cos/sin row once
(position from position_ids or t), then rotates all H query heads and all Hkv key heads of those
tokens as [tokens, heads, D/2] tiles,
upcast to fp32 right after the load and stored in the input dtype. The backward is the same
kernel with sin -> -sin (the inverse rotation, i.e. the transpose) applied to dq and dk.
Llama-3 frequency scaling lives in the tables (`llmstack.model.rope_tables`), not here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmstack.kernels import triton_interpreting

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _gather(table: torch.Tensor, position_ids: torch.Tensor | None, T: int) -> torch.Tensor:
    if position_ids is None:
        return table[:T][None, :, None, :]  # [1, T, 1, D/2]
    return table[position_ids][:, :, None, :]  # [B, T, 1, D/2]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_reference(q, k, cos, sin, position_ids=None):
    c, s = _gather(cos, position_ids, q.shape[1]), _gather(sin, position_ids, q.shape[1])
    return _rotate(q, c, s), _rotate(k, c, s)


def _rotate_full(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * [cos, cos] + [x2, x1] * [-sin, sin]: the same rotation in three ops."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.addcmul(x.float() * cos_full, torch.cat([x2, x1], dim=-1), sin_signed).to(x.dtype)


class _RopeTorch(torch.autograd.Function):
    """Saves only the (small) gathered tables: the backward is the inverse rotation of the
    gradients, so no activation is kept for it."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        c, s = _gather(cos, position_ids, q.shape[1]), _gather(sin, position_ids, q.shape[1])
        cos_full, sin_signed = torch.cat([c, c], -1), torch.cat([-s, s], -1)
        ctx.save_for_backward(cos_full, sin_signed)
        return _rotate_full(q, cos_full, sin_signed), _rotate_full(k, cos_full, sin_signed)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos_full, sin_signed = ctx.saved_tensors
        return _rotate_full(grad_q, cos_full, -sin_signed), _rotate_full(grad_k, cos_full, -sin_signed), None, None, None


def rope_torch(q, k, cos, sin, position_ids=None):
    return _RopeTorch.apply(q, k, cos, sin, position_ids)


# --- kernel ----------------------------------------------------------------------------------

@triton.jit
def _rotate_heads(X, Y, x_tok, y_tok, sx_h, sy_h, n_heads, cos, sin, tmask, d, dmask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # x_tok/y_tok: [BLOCK_TOK] token offsets; cos/sin: [BLOCK_TOK, BLOCK_D]; tile [BLOCK_TOK, BLOCK_H, BLOCK_D]
    h = tl.arange(0, BLOCK_H)
    mask = tmask[:, None, None] & (h < n_heads)[None, :, None] & dmask[None, None, :]
    x_off = x_tok[:, None, None] + h[None, :, None] * sx_h + d[None, None, :]
    y_off = y_tok[:, None, None] + h[None, :, None] * sy_h + d[None, None, :]
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, POS,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
                 sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h,
                 s_cos, s_sin, sp_b, sp_t,
                 n_tokens, T, H, HKV,
                 HALF: tl.constexpr, HAS_POS: tl.constexpr, INVERSE: tl.constexpr, BLOCK_TOK: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program = BLOCK_TOK consecutive tokens of the flattened (b, t) index, all heads of q and k
    tok = tl.program_id(0).to(tl.int64) * BLOCK_TOK + tl.arange(0, BLOCK_TOK)
    tmask = tok < n_tokens
    b = tok // T
    t = tok % T
    if HAS_POS:
        pos = tl.load(POS + b * sp_b + t * sp_t, mask=tmask, other=0).to(tl.int64)
    else:
        pos = t
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cmask = tmask[:, None] & dmask[None, :]
    cos = tl.load(COS + pos[:, None] * s_cos + d[None, :], mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + pos[:, None] * s_sin + d[None, :], mask=cmask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    _rotate_heads(Q, QO, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, sq_h, sqo_h, H, cos, sin, tmask, d, dmask,
                  HALF, BLOCK_H)
    _rotate_heads(K, KO, b * sk_b + t * sk_t, b * sko_b + t * sko_t, sk_h, sko_h, HKV, cos, sin, tmask, d, dmask,
                  HALF, BLOCK_HKV)


# --- launch ----------------------------------------------------------------------------------


def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, cos, sin, pos, inverse: bool):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q, k = _lastdim_contiguous(q), _lastdim_contiguous(k)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * T == 0:
        return qo, ko
    half = D // 2
    block_h, block_hkv = triton.next_power_of_2(H), triton.next_power_of_2(Hkv)
    block_d = triton.next_power_of_2(half)
    # tokens per program: a tile of ~4K q elements on GPU, much bigger under the interpreter
    # (where each program costs Python time)
    tile = 65536 if triton_interpreting() else 4096
    block_tok = max(1, min(triton.next_power_of_2(B * T), tile // (block_h * block_d)))
    num_warps = 4 if block_tok * block_h * block_d <= 2048 else 8
    _rope_kernel[(triton.cdiv(B * T, block_tok),)](
        q, k, qo, ko, cos, sin, pos if pos is not None else cos,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), sin.stride(0),
        pos.stride(0) if pos is not None else 0, pos.stride(1) if pos is not None else 0,
        B * T, T, H, Hkv,
        HALF=half, HAS_POS=pos is not None, INVERSE=inverse, BLOCK_TOK=block_tok,
        BLOCK_H=block_h, BLOCK_HKV=block_hkv, BLOCK_D=block_d, num_warps=num_warps)
    return qo, ko


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, pos):
        qo, ko = _launch(q, k, cos, sin, pos, inverse=False)
        ctx.save_for_backward(cos, sin, pos)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin, pos = ctx.saved_tensors
        # a missing output gradient is zero (materialized by autograd unless disabled)
        dq, dk = _launch(dqo, dko, cos, sin, pos, inverse=True)
        return dq, dk, None, None, None


def _check_inputs(q, k, cos, sin, position_ids):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(f"rope_triton: {name} on {t.device.type} needs TRITON_INTERPRET=1 (Triton interpreter); "
                               "use the torch backend instead")
        if t.device != q.device:
            raise ValueError(f"rope_triton: {name} is on {t.device}, q on {q.device}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope_triton: q and k must be [B, T, heads, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope_triton: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, T or D")
    if q.dtype != k.dtype or q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"rope_triton: q/k dtypes {q.dtype}/{k.dtype}; need one of float32, float16, bfloat16")
    D = q.shape[3]
    if D % 2:
        raise ValueError(f"rope_triton: head dim {D} must be even")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] * 2 != D:
        raise ValueError(f"rope_triton: cos/sin must both be [max_pos, D/2={D // 2}]; "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if not cos.is_floating_point() or not sin.is_floating_point():
        raise ValueError("rope_triton: cos/sin tables must be floating point")
    if position_ids is None:
        if q.shape[1] > cos.shape[0]:
            raise ValueError(f"rope_triton: sequence length {q.shape[1]} exceeds the table's {cos.shape[0]} positions")
    else:
        if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise ValueError(f"rope_triton: position_ids must be integers, got {position_ids.dtype}")
        if position_ids.device != q.device:
            raise ValueError(f"rope_triton: position_ids on {position_ids.device}, q on {q.device}")
        if position_ids.dim() != 2 or position_ids.shape[1] != q.shape[1] or position_ids.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"rope_triton: position_ids must be [B, T] = {tuple(q.shape[:2])}; "
                             f"got {tuple(position_ids.shape)}")


def rope_triton(q, k, cos, sin, position_ids=None):
    """Rotate q [B, T, H, D] and k [B, T, Hkv, D] by the cos/sin tables [max_pos, D/2] at
    position_ids [B, T] (None: 0..T-1) in one Triton launch; outputs in the inputs' dtype."""
    _check_inputs(q, k, cos, sin, position_ids)
    cos = _lastdim_contiguous(cos.float())
    sin = _lastdim_contiguous(sin.float())
    pos = None
    if position_ids is not None:
        pos = position_ids.expand(q.shape[0], q.shape[1])
        # out-of-table positions would read out of bounds: checked without a host sync on CUDA
        torch._assert_async(((pos >= 0) & (pos < cos.shape[0])).all(),
                            "rope_triton: position_ids outside [0, max_pos) of the cos/sin tables")
    return _RopeFunction.apply(q, k, cos, sin, pos)
