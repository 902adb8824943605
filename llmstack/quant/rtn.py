"""Round-to-nearest (RTN) weight quantization into the formats of `kernels/dequant_matmul.py`.

- int8: per output channel, symmetric: s = max|w| / 127, q = round(w / s) in [-127, 127].
- int4: per group of G input columns, asymmetric: s = (max - min) / 15, z = round(-min / s) in
  [1, 15], q = clamp(round(w / s) + z, 0, 15). The group range always includes 0, so an all-zero
  group (and zero padding) stays exactly zero.

Both follow what the standard GPTQ checkpoint layout can hold (`quant/gptq_format.py`), so a
quantized model is saved without a second rounding: scales are fp16 values (rounded up, so the
range still covers the weights), and int4 zero points are never 0, because GPTQ's "v1" files
store zero - 1 in 4 bits (the layout vLLM, exllama and transformers read). A group whose
negative side is under one step (the only case where z would round to 0) gets a scale of
max / 14 and z = 1 instead.

`quant_params` / `quantize_with` are also what GPTQ uses: it fixes the scales of a group from the
(partially updated) weights, then rounds column by column with them.
"""
from __future__ import annotations

import math

import torch

from llmstack.kernels.dequant_matmul import pack_int4

INT8_MAX = 127
INT4_MAX = 15
_FP16_TINY = 2.0 ** -24  # the smallest positive fp16 (subnormal)
_FP16_MAX = 65504.0


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def fp16_ceil(s: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= s (fp32 result), for positive s."""
    h = s.clamp(_FP16_TINY, _FP16_MAX).half()
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def quant_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of w [N, k] (one int8 channel or one int4 group), fp32."""
    w = w.float()
    if bits == 8:
        scale = fp16_ceil(w.abs().amax(dim=1) / INT8_MAX)
        return scale, torch.zeros_like(scale)
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
    scale = fp16_ceil(torch.maximum((hi - lo) / INT4_MAX, hi / (INT4_MAX - 1)))
    zero = torch.round(-lo / scale).clamp(1, INT4_MAX)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w [N, k] (fp32) under per-row scale/zero."""
    if bits == 8:
        return torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, INT4_MAX)


def dequantize_with(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero[:, None]) * scale[:, None]


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scale, zero = quant_params(w, 8)
    q = quantize_with(w.float(), scale, zero, 8)
    return {"qweight": q.to(torch.int8).contiguous(), "scales": scale.contiguous()}


def quantize_int4(w: torch.Tensor, *, group_size: int) -> dict[str, torch.Tensor]:
    N, K = w.shape
    G = n_groups(K, group_size)
    codes = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    scales = torch.empty(N, G, dtype=torch.float32, device=w.device)
    zeros = torch.empty(N, G, dtype=torch.uint8, device=w.device)
    wf = w.float()
    for g in range(G):
        cols = slice(g * group_size, min((g + 1) * group_size, K))
        s, z = quant_params(wf[:, cols], 4)
        codes[:, cols] = quantize_with(wf[:, cols], s, z, 4).to(torch.uint8)
        scales[:, g], zeros[:, g] = s, z.to(torch.uint8)
    return {"qweight": pack_int4(codes), "scales": scales, "zeros": zeros}


def quantize_rtn(w: torch.Tensor, *, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    return quantize_int8(w) if bits == 8 else quantize_int4(w, group_size=group_size)
