"""Causal grouped-query attention. q: [B, T, H, D], k/v: [B, T, Hkv, D] -> [B, T, H, D].
doc_ids: optional [B, T] ints; a query attends only to keys of the same document (packing).

Three implementations:

- `attention_reference`: plain torch, fp32 math, materialises the T x T scores (tests only);
- `attention_torch`: SDPA (the CPU path);
- `attention_triton`: our FlashAttention-2 kernels (forward with online softmax, backward by
  recomputation), run on CUDA or, for tests, on CPU under the Triton interpreter. The kernels,
  their loop structure (unmasked off-diagonal blocks, masked diagonal, divisible-length
  specialisation, transposed dK/dV, document block skipping) and their per-head-dim configs are
  in attention_kernels.py; this file holds the checks, the launches and the autograd Function.

Host-side notes:

- q/k/v/o/dO are passed with their strides (no transpose or copy; only a non-unit last stride is
  made contiguous). GQA: repeated K/V are never materialised.
- The forward stores the per-row log-sum-exp (fp32, base 2, [B, H, T]) for the backward.
- doc_ids -> `_doc_bounds`: each token's document start and end ([B, 2, T] int32, -1 for rows
  whose ids are not non-decreasing), computed with a few device ops and no host sync, once per
  forward and saved for the backward. The kernels skip key/query blocks outside the documents.
- Backward: `bwd_preprocess` (delta = rowsum(dO * O)), `bwd_dkdv` (per key block of one kv head,
  GQA reduction in registers: deterministic, no atomics), `bwd_dq` (per query block).
- All accumulation is fp32. fp16/bf16 operands go to tl.dot as they are; fp32 operands use
  input_precision="ieee" (no TF32) so fp32 results match the reference.
- Under the Triton interpreter (TRITON_INTERPRET=1) bf16 arithmetic is wrong (upstream triton
  issue 11584, bf16 held as raw uint16 bits) so loads are upcast to fp32 right after tl.load
  there (UPCAST); and autotune with several configs fails ("0 active drivers"), so one config per
  kernel is used when interpreting.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton

from llmstack.kernels import attention_kernels as K, triton_interpreting


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


_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


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
    if q.device.type != "cuda" and not (q.device.type == "cpu" and triton_interpreting()):
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
    block_d = max(16, triton.next_power_of_2(D))
    return dict(
        BLOCK_D=block_d,
        EVEN_D=block_d == D,
        UPCAST=triton_interpreting() and q.dtype == torch.bfloat16,  # triton issue 11584
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for fp16/bf16 operands
    )


def _contig_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _doc_bounds(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] doc ids -> [B, 2, T] int32: each token's document start (row 0) and end (row 1,
    exclusive), i.e. the contiguous run of its id; -1 in rows whose ids are not non-decreasing,
    where a run start would not bound the tokens sharing the id. Device ops only (no host sync)."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device, dtype=torch.int32).expand(B, T)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]
    edge = torch.ones((B, 1), dtype=torch.bool, device=doc_ids.device)
    first = torch.cat([edge, change], dim=1)                       # token starts a run
    last = torch.cat([change, edge], dim=1)                        # token ends a run
    start = torch.where(first, t, 0).cummax(dim=1).values
    end = torch.where(last, t + 1, T).flip(1).cummin(dim=1).values.flip(1)
    mono = (doc_ids[:, 1:] >= doc_ids[:, :-1]).all(dim=1, keepdim=True)
    bounds = torch.stack([start, end], dim=1).to(torch.int32)
    return torch.where(mono[:, :, None], bounds, -1).contiguous()


def _tma_ok(q, k, v, meta) -> bool:
    """Whether the forward reads Q/K/V through TMA descriptors: a CUDA GPU of compute capability
    >= 9.0, 16-bit operands, an unpadded head dim, heads packed in each row ([B, T, heads*D] views
    of any row and batch strides) and the 16-byte alignment TMA needs."""
    if K.TensorDescriptor is None or triton_interpreting() or not q.is_cuda or q.dtype == torch.float32 or not meta["EVEN_D"]:
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    D, size = q.shape[3], q.element_size()
    return all(t.stride(2) == D and t.stride(1) * size % 16 == 0 and t.stride(0) * size % 16 == 0
               and t.data_ptr() % 16 == 0 for t in (q, k, v))


def _descriptor(t):
    """[B, T, heads, D] -> TMA descriptor of the [B, T, heads*D] view (block shape set per config)."""
    B, T, Hx, D = t.shape
    return K.TensorDescriptor(t, [B, T, Hx * D], [t.stride(0), t.stride(1), 1], [1, 16, D])


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, doc_ids):
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        meta = _meta(q)
        o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
        has_doc = doc_ids is not None
        bounds = _doc_bounds(doc_ids) if has_doc else None
        doc, bnd = (doc_ids, bounds) if has_doc else (lse, lse)  # dummy pointers, never read without HAS_DOC
        sdb, sdt = (doc_ids.stride(0), doc_ids.stride(1)) if has_doc else (0, 0)
        tma = _tma_ok(q, k, v, meta)
        qa, ka, va = (_descriptor(q), _descriptor(k), _descriptor(v)) if tma else (q, k, v)
        K.attn_fwd[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](
            qa, ka, va, o, lse, doc, bnd,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), sdb, sdt,
            T, H, D, H // Hkv, scale * _LOG2E,
            CAUSAL=causal, HAS_DOC=has_doc, TMA=tma, **meta,
        )
        ctx.save_for_backward(q, k, v, o, lse, doc_ids if has_doc else None, bounds)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc_ids, bounds = ctx.saved_tensors
        causal, scale = ctx.causal, ctx.scale
        do = _contig_last(do)
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        G = H // Hkv
        meta = _meta(q)
        has_doc = doc_ids is not None
        doc, bnd = (doc_ids, bounds) if has_doc else (lse, lse)
        sdb, sdt = (doc_ids.stride(0), doc_ids.stride(1)) if has_doc else (0, 0)

        delta = torch.empty_like(lse)
        pre_m = 32 if triton_interpreting() else 64
        K.bwd_preprocess[(triton.cdiv(T, pre_m), B * H)](
            o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
            T, H, D, BLOCK_M=pre_m, BLOCK_D=meta["BLOCK_D"],
        )

        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
        K.bwd_dkdv[lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, doc, bnd, *strides,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), sdb, sdt,
            T, H, Hkv, D, G, scale, scale * _LOG2E,
            CAUSAL=causal, HAS_DOC=has_doc, **meta,
        )
        K.bwd_dq[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, doc, bnd, *strides,
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
