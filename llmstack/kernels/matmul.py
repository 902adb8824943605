"""Matmul with fused epilogue. The model uses it for the SwiGLU gate-up projection:
silu(x @ w_gate.T) * (x @ w_up.T) in one pass over x."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gate_up_swiglu_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ w_gate.t()) * (x @ w_up.t())


def gate_up_swiglu_torch(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return gate_up_swiglu_reference(x, w_gate, w_up)
