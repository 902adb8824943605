"""SwiGLU elementwise: silu(gate) * up (computed in fp32, stored in the input dtype)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_reference(gate, up)
