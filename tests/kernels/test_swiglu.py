"""SwiGLU, both implementations (torch, and the Triton kernels through the interpreter on CPU),
forward, d_gate and d_up, against the definition written out independently of either:
silu(g) = g / (1 + e^-g), with the derivatives by hand (not autograd), in float64."""

import pytest
import torch

from llmstack.kernels.swiglu import swiglu_backward_into, swiglu_torch, swiglu_triton
from tests.kernels.grads import forward_backward
from tests.kernels.tolerances import assert_close
from tests.kernels.tolerances import compare as _compare

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = {"torch": swiglu_torch, "triton": swiglu_triton}


def swiglu_formula(g, u, dy):
    """(y, d_gate, d_up) from the definition, in g's dtype: y = g u / (1 + e^-g),
    dy/dg = u (s + g s (1 - s)) with s = 1 / (1 + e^-g), dy/du = g s."""
    s = 1.0 / (1.0 + torch.exp(-g))
    return g * s * u, dy * u * (s + g * s * (1.0 - s)), dy * g * s


def _run(fn, gate, up, gy):
    return forward_backward(fn, [gate, up], [gy])


def _check(impl, dtype, shape, gate_scale=1.0):
    torch.manual_seed(0)
    gate = (gate_scale * torch.randn(shape)).to(dtype)
    up = torch.randn(shape, dtype=dtype)
    gy = torch.randn(shape, dtype=dtype)
    ours = _run(IMPLS[impl], gate, up, gy)
    ref = [t.float() for t in swiglu_formula(gate.double(), up.double(), gy.double())]
    eager = swiglu_formula(gate, up, gy)  # the same formula evaluated in the low precision
    assert all(t.dtype == dtype and t.shape == gate.shape for t in ours)
    for o, e, r, what in zip(ours, eager, ref, ("y", "d_gate", "d_up")):
        _compare(o, e, r, dtype, f"{impl} {what}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (17, 100), (2, 9, 1000), (257, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_swiglu_forward_backward(impl, dtype, shape):
    _check(impl, dtype, shape)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_large_gates(impl, dtype):
    """Gates far into both tails of the sigmoid (|gate| up to ~40): no inf/nan, still accurate."""
    _check(impl, dtype, (7, 100), gate_scale=12.0)


def test_swiglu_noncontiguous_inputs():
    torch.manual_seed(2)
    gu = torch.randn(6, 2 * 100)
    gate, up = gu[:, :100], gu[:, 100:]
    assert_close(swiglu_triton(gate, up), swiglu_formula(gate, up, up)[0], torch.float32, "y")


def test_backward_into_row_strided_halves():
    """The gate-up backward's use: d_gate / d_up written as the two halves of one [M, 2N] buffer,
    from an expanded (stride-0) grad_output; the rest of the buffer untouched."""
    torch.manual_seed(3)
    M, N = 9, 70
    g, u = torch.randn(M, N), torch.randn(M, N)
    dy = torch.randn(1, N).expand(M, N)
    d = torch.full((M, 2 * N + 3), 7.0)[:, :2 * N]  # row stride 2N + 3
    swiglu_backward_into(dy, g, u, d[:, :N], d[:, N:])
    _, dg, du = swiglu_formula(g.double(), u.double(), dy.double())
    assert_close(d[:, :N], dg, torch.float32, "d_gate half")
    assert_close(d[:, N:], du, torch.float32, "d_up half")
    assert torch.equal(d.as_strided((M, 3), (2 * N + 3, 1), 2 * N), torch.full((M, 3), 7.0))


def test_swiglu_rejects_bad_input():
    with pytest.raises(ValueError, match="match"):
        swiglu_triton(torch.randn(3, 64), torch.randn(3, 32))
    with pytest.raises(ValueError, match="match"):
        swiglu_triton(torch.randn(3, 64), torch.randn(3, 64).half())
    with pytest.raises(ValueError, match="unsupported"):
        swiglu_triton(torch.randn(3, 64).double(), torch.randn(3, 64).double())
