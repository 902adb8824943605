"""The SwiGLU paths the model runs (the torch path on CPU, the Triton kernels on GPU) against the
float64 references of tests/kernels/references.py, forward and every gradient."""
import pytest
import torch

from llmstack.kernels.matmul import gate_up_swiglu_torch, gate_up_swiglu_triton
from llmstack.kernels.swiglu import swiglu_torch, swiglu_triton
from tests.kernels.grads import forward_backward
from tests.kernels.references import gate_up_swiglu_ref, swiglu_ref
from tests.kernels.tolerances import compare

LOW_PRECISION = [torch.float16, torch.bfloat16]


def _swiglu_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # gates well into both tails of the sigmoid too
    return [(torch.randn(shape, generator=g) * s).to(dtype) for s in (4.0, 1.0, 1.0)]


def _gate_up_inputs(lead, K, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    wg, wu = (torch.randn(H, K, generator=g) * K ** -0.5 for _ in range(2))
    go = torch.randn(*lead, H, generator=g)
    return [t.to(dtype) for t in (x, wg, wu, go)]


def _check(fn, ref_fn, inputs, grad_out, names):
    """fp32: close to the float64 reference; fp16/bf16: within 2x the error of the reference
    formula evaluated in that precision (tests/kernels/tolerances.py)."""
    dtype = inputs[0].dtype
    ours = forward_backward(fn, inputs, [grad_out])
    ref = forward_backward(ref_fn, [t.double() for t in inputs], [grad_out])
    eager = forward_backward(ref_fn, inputs, [grad_out])
    for o, e, r, what in zip(ours, eager, ref, names, strict=True):
        assert o.dtype == dtype, (what, o.dtype)
        compare(o, e, r, dtype, f"{fn.__name__} {dtype} {what}")


@pytest.mark.parametrize("fn", [swiglu_torch, swiglu_triton], ids=["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_swiglu_matches_independent_reference(fn, dtype):
    gate, up, gy = _swiglu_inputs((7, 130), dtype)
    _check(fn, swiglu_ref, [gate, up], gy, ("y", "d_gate", "d_up"))


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("lead,K,H", [((2, 9), 64, 100), ((1,), 17, 129)])
def test_gate_up_swiglu_torch_matches_independent_reference(dtype, lead, K, H):
    x, wg, wu, go = _gate_up_inputs(lead, K, H, dtype)
    _check(gate_up_swiglu_torch, gate_up_swiglu_ref, [x, wg, wu], go, ("y", "dx", "dW_gate", "dW_up"))


def test_gate_up_swiglu_triton_matches_independent_reference():
    # fp32 only: bf16 tl.dot is wrong under the Triton interpreter (tests/kernels/test_matmul.py)
    x, wg, wu, go = _gate_up_inputs((3, 5), 48, 80, torch.float32, seed=1)
    _check(gate_up_swiglu_triton, gate_up_swiglu_ref, [x, wg, wu], go, ("y", "dx", "dW_gate", "dW_up"))
