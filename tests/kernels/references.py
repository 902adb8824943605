"""Test-side references, written from the formulas, independent of the code under test
(llmstack's own `*_reference` functions are what its torch paths call, so they cannot be the
oracle for those paths). They compute in the dtype they are given: float64 inputs make the
oracle, low-precision inputs the eager baseline of the tolerance rule in tolerances.py.

SwiGLU (Shazeer 2020, as in Llama's MLP): y = silu(gate) * up, silu(g) = g * sigmoid(g);
the fused gate-up form first projects x: gate = x W_gate^T, up = x W_up^T.
"""
import torch


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate * torch.sigmoid(gate) * up


def gate_up_swiglu_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    gate = torch.einsum("...k,hk->...h", x, w_gate)
    up = torch.einsum("...k,hk->...h", x, w_up)
    return swiglu_ref(gate, up)
