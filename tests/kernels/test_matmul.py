"""Tiled GEMM with fused epilogues and the fused gate-up SwiGLU (Triton interpreter on CPU)."""
import os

import pytest
import torch
import torch.nn.functional as F

from llmstack.kernels.matmul import gate_up_swiglu_torch, gate_up_swiglu_triton, matmul_triton
from tests.kernels.grads import forward_backward
from tests.kernels.tolerances import assert_close, assert_within_eager_error

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BF16_SKIP = pytest.mark.skipif(
    INTERPRET, reason="bf16 tl.dot is wrong under the Triton interpreter (upstream triton issue 11584: bf16 "
                      "held as raw uint16 bits); runs on GPU")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=BF16_SKIP)]

# odd shapes over {1, 17, 64, 100, 129}: single rows/cols, partial tiles in every dim, several tiles
SHAPES = [(1, 17, 64), (17, 1, 100), (64, 129, 17), (100, 64, 1), (129, 100, 129), (1, 1, 1), (17, 17, 17),
          (129, 129, 64)]


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cpu") * scale).to(torch.get_default_device(), dtype)


def epilogue_ref(a, b_t, bias=None, activation=None, residual=None):
    y = a @ b_t.t()
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual
    return y


def check(ours, fn_ref, inputs, dtype, what):
    """fp32: fixed tolerance against the fp32 reference; fp16/bf16: within eager's own error."""
    ref32 = fn_ref(*[x.float() if isinstance(x, torch.Tensor) else x for x in inputs])
    if dtype == torch.float32:
        assert_close(ours, ref32, dtype, what)
    else:
        assert ours.dtype == dtype
        assert_within_eager_error(ours, fn_ref(*inputs), ref32, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matmul_shapes(M, N, K, dtype):
    a = rand(M, K, dtype=dtype, seed=1, scale=K ** -0.5)
    b_t = rand(N, K, dtype=dtype, seed=2)
    check(matmul_triton(a, b_t), lambda a, b: a @ b.t(), (a, b_t), dtype, f"mm {M}x{N}x{K}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epi", ["bias", "silu", "gelu", "residual", "bias+gelu+residual", "bias+silu"])
def test_matmul_epilogues(epi, dtype):
    M, N, K = 37, 100, 64
    a = rand(M, K, dtype=dtype, seed=1, scale=K ** -0.5)
    b_t = rand(N, K, dtype=dtype, seed=2)
    bias = rand(N, dtype=dtype, seed=3) if "bias" in epi else None
    act = "silu" if "silu" in epi else ("gelu" if "gelu" in epi else None)
    res = rand(M, N, dtype=dtype, seed=4) if "residual" in epi else None
    ours = matmul_triton(a, b_t, bias=bias, activation=act, residual=res)

    def ref(a, b_t, bias, res):
        return epilogue_ref(a, b_t, bias, act, res)

    check(ours, ref, (a, b_t, bias, res), dtype, f"epilogue {epi}")


def test_matmul_strided_operands_and_leading_dims():
    # transposed views (the backward's usage) and a [..., K] input
    a = rand(64, 2, 17, seed=1).permute(1, 2, 0)        # [2, 17, 64], non-contiguous
    w = rand(64, 100, seed=2)                             # b_t = w.t(): [100, 64] view
    res = rand(2, 17, 100, seed=3)
    ours = matmul_triton(a, w.t(), residual=res, activation="silu")
    assert ours.shape == (2, 17, 100)
    assert_close(ours, F.silu(a @ w) + res, torch.float32, "strided")


def test_matmul_rejects_bad_args():
    a, b = rand(4, 8), rand(5, 9)
    with pytest.raises(ValueError, match="inner dims"):
        matmul_triton(a, b)
    with pytest.raises(ValueError, match="activation"):
        matmul_triton(a, rand(5, 8), activation="relu")


def _fwd_bwd(fn, x, wg, wu, go):
    return forward_backward(fn, [x, wg, wu], [go])


def gate_up_formula(x, wg, wu, go):
    """(y, dx, dWg, dWu) written out from the definition, in the inputs' dtype, independent of
    both implementations: a = x Wg^T, b = x Wu^T, y = a s b with s = 1 / (1 + e^-a);
    dA = go b (s + a s (1 - s)), dB = go a s; dx = dA Wg + dB Wu, dWg = dA^T x, dWu = dB^T x."""
    x2, go2 = x.reshape(-1, x.shape[-1]), go.reshape(-1, go.shape[-1])
    a, b = x2 @ wg.t(), x2 @ wu.t()
    s = 1.0 / (1.0 + torch.exp(-a))
    da, db = go2 * b * (s + a * s * (1.0 - s)), go2 * a * s
    dx = da @ wg + db @ wu
    return (a * s * b).reshape(go.shape), dx.reshape(x.shape), da.t() @ x2, db.t() @ x2


GATE_UP_IMPLS = {"torch": gate_up_swiglu_torch, "triton": gate_up_swiglu_triton}


@pytest.mark.parametrize("impl", GATE_UP_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,K,H", [((2, 9), 64, 100), ((1,), 17, 129), ((37,), 100, 64)])
def test_gate_up_swiglu_fwd_bwd(impl, lead, K, H, dtype):
    if impl == "triton" and dtype == torch.bfloat16 and INTERPRET:
        pytest.skip(BF16_SKIP.kwargs["reason"])
    x = rand(*lead, K, dtype=dtype, seed=1)
    wg = rand(H, K, dtype=dtype, seed=2, scale=K ** -0.5)
    wu = rand(H, K, dtype=dtype, seed=3, scale=K ** -0.5)
    go = rand(*lead, H, dtype=dtype, seed=4)
    ours = _fwd_bwd(GATE_UP_IMPLS[impl], x, wg, wu, go)
    ref = [t.float() for t in gate_up_formula(x.double(), wg.double(), wu.double(), go.double())]
    names = ("out", "dx", "dWg", "dWu")
    assert ours[0].shape == (*lead, H) and ours[1].shape == x.shape
    if dtype == torch.float32:
        for n, a, b in zip(names, ours, ref):
            assert_close(a, b, dtype, f"{impl} gate_up {n}")
    else:
        eager = gate_up_formula(x, wg, wu, go)  # the same formula in the low precision
        for n, a, b, c in zip(names, ours, eager, ref):
            assert a.dtype == dtype
            assert_within_eager_error(a, b, c, dtype, f"{impl} gate_up {dtype} {n}")


def test_gate_up_backward_is_one_dx_gemm_and_one_dw_gemm(monkeypatch):
    """Backward: the fused SwiGLU backward kernel, then dx as one GEMM over [Wg; Wu] (split
    operand, no concatenated copy) and [dWg; dWu] as one GEMM."""
    import llmstack.kernels.matmul as mm
    calls = []
    real = mm._launch

    def spy(a2, b_t, **kw):
        calls.append((tuple(a2.shape), tuple(b_t.shape), kw.get("split_b", False), kw.get("b2_t") is not None))
        return real(a2, b_t, **kw)

    monkeypatch.setattr(mm, "_launch", spy)
    x, wg, wu = rand(5, 24, seed=1), rand(40, 24, seed=2, scale=0.2), rand(40, 24, seed=3, scale=0.2)
    _fwd_bwd(gate_up_swiglu_triton, x, wg, wu, rand(5, 40, seed=4))
    assert calls == [((5, 24), (40, 24), False, True),      # forward: two accumulators, one pass over x
                     ((5, 80), (24, 40), True, True),       # dx = [dgate dup] @ [Wg; Wu]
                     ((80, 5), (24, 5), False, False)], calls  # [dWg; dWu] = [dgate dup]^T x


@pytest.mark.parametrize("K1,K2", [(17, 45), (64, 32), (1, 100)])
def test_matmul_split_operand(K1, K2):
    """out = a[:, :K1] @ b1.T + a[:, K1:] @ b2.T in one accumulator (partial K tiles on both sides)."""
    import llmstack.kernels.matmul as mm
    a = rand(37, K1 + K2, seed=1)
    b1, b2 = rand(K1, 50, seed=2).t(), rand(K2, 50, seed=3).t()   # [50, K1], [50, K2] transposed views
    out = mm._launch(a, b1, b2_t=b2, split_b=True)
    assert_close(out, a @ torch.cat([b1, b2], dim=1).t(), torch.float32, f"split {K1}+{K2}")
    with pytest.raises(ValueError, match="split operand"):
        mm._launch(a, b1, b2_t=rand(50, K2 + 1, seed=4), split_b=True)


def test_gate_up_swiglu_no_grad_and_frozen_weights():
    x, wg, wu = rand(5, 32, seed=1), rand(48, 32, seed=2, scale=0.2), rand(48, 32, seed=3, scale=0.2)
    with torch.no_grad():
        y = gate_up_swiglu_triton(x, wg, wu)
    assert not y.requires_grad
    ones = torch.ones(5, 48)
    y_ref, dx_ref, _, _ = gate_up_formula(x.double(), wg.double(), wu.double(), ones.double())
    assert_close(y, y_ref, torch.float32, "no-grad")
    xx = x.clone().requires_grad_(True)  # frozen weights (LoRA-style): only dx
    gate_up_swiglu_triton(xx, wg, wu).sum().backward()
    assert_close(xx.grad, dx_ref, torch.float32, "dx frozen")
    wu_only = wu.clone().requires_grad_(True)  # one weight trainable: only its half of the dW GEMM
    gate_up_swiglu_triton(x, wg, wu_only).backward(ones)
    assert_close(wu_only.grad, gate_up_formula(x.double(), wg.double(), wu.double(), ones.double())[3],
                 torch.float32, "dWu alone")


@BF16_SKIP
def test_gate_up_swiglu_autocast_bf16():
    x, wg, wu = rand(3, 7, 64, seed=1), rand(96, 64, seed=2, scale=0.125), rand(96, 64, seed=3, scale=0.125)
    go = rand(3, 7, 96, seed=4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, wg, wu, go = (t.to(dev) for t in (x, wg, wu, go))
    with torch.autocast(dev, dtype=torch.bfloat16):
        ours = _fwd_bwd(gate_up_swiglu_triton, x, wg, wu, go)
        eager = _fwd_bwd(gate_up_swiglu_torch, x, wg, wu, go)
    ref = [t.float() for t in gate_up_formula(x.double(), wg.double(), wu.double(), go.double())]
    assert ours[2].dtype == torch.float32
    for n, a, b, c in zip(("out", "dx", "dWg", "dWu"), ours, eager, ref):
        assert_within_eager_error(a, b, c, torch.bfloat16, f"autocast {n}")


@pytest.mark.skipif(not INTERPRET, reason="interpreter-only guard")
def test_bf16_refused_under_interpreter():
    # triton issue 11584: wrong bf16 tl.dot under the interpreter -> a loud error, not wrong numbers
    with pytest.raises(NotImplementedError, match="11584"):
        matmul_triton(rand(4, 32, dtype=torch.bfloat16), rand(32, 32, dtype=torch.bfloat16))
    with pytest.raises(NotImplementedError, match="11584"), torch.autocast("cpu", dtype=torch.bfloat16):
        gate_up_swiglu_triton(rand(4, 32), rand(32, 32), rand(32, 32))


def test_matmul_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        matmul_triton(rand(4, 8), rand(5, 8))

@pytest.mark.slow
def test_gate_up_swiglu_larger():
    x = rand(4, 33, 160, seed=1)
    wg, wu = rand(272, 160, seed=2, scale=160 ** -0.5), rand(272, 160, seed=3, scale=160 ** -0.5)
    go = rand(4, 33, 272, seed=4)
    ours = _fwd_bwd(gate_up_swiglu_triton, x, wg, wu, go)
    ref = [t.float() for t in gate_up_formula(x.double(), wg.double(), wu.double(), go.double())]
    for n, a, b in zip(("out", "dx", "dWg", "dWu"), ours, ref):
        assert_close(a, b, torch.float32, f"larger {n}")
