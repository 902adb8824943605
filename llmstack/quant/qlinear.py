"""`QuantLinear`: a weight-only quantized drop-in for nn.Linear (int8 per channel or packed int4
groups), computing y = x @ dequant(W).T through `kernels/dequant_matmul.py`.

The quantized tensors are buffers (saved in the state dict, never optimized). `backend` is
resolved once: "auto" = Triton on CUDA, torch on CPU; "triton" on CPU needs TRITON_INTERPRET=1;
on a GPU lacking what the kernels need (int4 on older parts) the error names the torch fallback
up front, rather than failing inside a kernel launch.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from llmstack.kernels import KernelUnavailable, choose_backend
from llmstack.kernels.dequant_matmul import (QuantKernelUnavailable, check_gpu_support, dequant_matmul,
                                             dequantize_int4, dequantize_int8)
from llmstack.quant.rtn import n_groups

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """`kernels.choose_backend`, with the quantized kernels' own checks: the value is validated and
    a GPU must have what the dequant kernels need."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise QuantKernelUnavailable(f"--backend: got {backend!r}, allowed: {', '.join(BACKENDS)}")
    try:
        chosen = choose_backend(backend, device.type)
    except KernelUnavailable:
        raise QuantKernelUnavailable("backend=triton on a CPU device needs TRITON_INTERPRET=1 (the Triton "
                                     "interpreter); use backend=torch or auto") from None
    if chosen == "triton" and device.type == "cuda":
        check_gpu_support(device, dtype)
    return chosen


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int = 128, bias: bool = False,
                 backend: str = "torch", device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantLinear: bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else 0
        self.backend = backend
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32, device=device))
            self.zeros = None
        else:
            g = n_groups(in_features, group_size)
            self.register_buffer("qweight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.zeros(out_features, g, dtype=torch.float32, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, g, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        # GPTQ desc_act checkpoints: input rows stored sorted by group; the input is permuted to match
        self.register_buffer("in_perm", None)

    def set_input_permutation(self, perm: torch.Tensor) -> None:
        self.in_perm = perm.to(device=self.qweight.device, dtype=torch.long)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, in_features: int, bits: int, group_size: int,
                     bias: torch.Tensor | None = None, backend: str = "torch") -> "QuantLinear":
        out_features = tensors["qweight"].shape[0]
        dev = tensors["qweight"].device
        m = cls(in_features, out_features, bits=bits, group_size=group_size, bias=bias is not None, backend=backend,
                device=dev)
        for name, t in tensors.items():
            getattr(m, name).copy_(t)
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The [out, in] weight this layer computes with, in the original input order."""
        if self.bits == 8:
            w = dequantize_int8(self.qweight, self.scales, dtype)
        else:
            w = dequantize_int4(self.qweight, self.scales, self.zeros, group_size=self.group_size,
                                in_features=self.in_features, dtype=dtype)
        if self.in_perm is not None:
            w = w[:, torch.argsort(self.in_perm)]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_perm is not None:
            x = x.index_select(-1, self.in_perm)
        y = dequant_matmul(x, self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                           in_features=self.in_features, backend=self.backend)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}, backend={self.backend}"
