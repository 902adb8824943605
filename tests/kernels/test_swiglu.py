"""SwiGLU Triton kernels (forward, d_gate, d_up) against the fp32 reference, through the Triton
interpreter on CPU."""

import pytest
import torch
import torch.nn.functional as F

from llmstack.kernels.swiglu import swiglu_reference, swiglu_triton
from tests.kernels.grads import forward_backward
from tests.kernels.tolerances import assert_close
from tests.kernels.tolerances import compare as _compare

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(fn, gate, up, gy):
    return forward_backward(fn, [gate, up], [gy])


def _eager_lowp(gate, up):
    return F.silu(gate) * up


def _check(dtype, shape, gate_scale=1.0):
    torch.manual_seed(0)
    gate = (gate_scale * torch.randn(shape)).to(dtype)
    up = torch.randn(shape, dtype=dtype)
    gy = torch.randn(shape, dtype=dtype)
    ours = _run(swiglu_triton, gate, up, gy)
    ref = _run(swiglu_reference, gate.float(), up.float(), gy)
    eager = _run(_eager_lowp, gate, up, gy)
    assert all(t.dtype == dtype and t.shape == gate.shape for t in ours)
    for o, e, r, what in zip(ours, eager, ref, ("y", "d_gate", "d_up")):
        _compare(o, e, r, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (17, 100), (2, 9, 1000), (257, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_swiglu_forward_backward(dtype, shape):
    _check(dtype, shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_large_gates(dtype):
    """Gates far into both tails of the sigmoid (|gate| up to ~40): no inf/nan, still accurate."""
    _check(dtype, (7, 100), gate_scale=12.0)


def test_swiglu_formula_of_the_gradient():
    """d_gate = dy * up * sig * (1 + gate * (1 - sig)), d_up = dy * silu(gate), written out."""
    torch.manual_seed(1)
    g, u, dy = torch.randn(5, 33), torch.randn(5, 33), torch.randn(5, 33)
    _, dg, du = _run(swiglu_triton, g, u, dy)
    sig = torch.sigmoid(g)
    assert_close(dg, dy * u * sig * (1 + g * (1 - sig)), torch.float32, "d_gate")
    assert_close(du, dy * g * sig, torch.float32, "d_up")


def test_swiglu_noncontiguous_inputs():
    torch.manual_seed(2)
    gu = torch.randn(6, 2 * 100)
    gate, up = gu[:, :100], gu[:, 100:]
    assert_close(swiglu_triton(gate, up), swiglu_reference(gate, up), torch.float32, "y")


def test_swiglu_rejects_bad_input():
    with pytest.raises(ValueError, match="match"):
        swiglu_triton(torch.randn(3, 64), torch.randn(3, 32))
    with pytest.raises(ValueError, match="match"):
        swiglu_triton(torch.randn(3, 64), torch.randn(3, 64).half())
    with pytest.raises(ValueError, match="unsupported"):
        swiglu_triton(torch.randn(3, 64).double(), torch.randn(3, 64).double())
