"""Fused CE + KD loss: reference vs textbook formulas (incl. the T^2 gradient scaling), the
chunked torch path and the Triton kernel (interpreter) vs the reference, forward and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from llmstack.kernels import chunked_loss
from llmstack.kernels.chunked_loss import TargetOutOfRange
from llmstack.kernels.kd_loss import KINDS, kd_loss, kd_loss_reference, kd_loss_torch, kd_loss_triton
from tests.kernels.grads import forward_backward
from tests.kernels.tolerances import assert_within_eager_error


def _inputs(N=37, D=32, Dt=48, V=300, dtype=torch.float32, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    dev = torch.get_default_device()  # CUDA under make test-gpu (tests/kernels/conftest.py)
    h_s = (torch.randn(N, D, generator=g, device="cpu")).to(dev, dtype)
    w_s = (torch.randn(V, D, generator=g, device="cpu") * 0.3).to(dev, dtype)
    h_t = (torch.randn(N, Dt, generator=g, device="cpu")).to(dev, dtype)
    w_t = (torch.randn(V, Dt, generator=g, device="cpu") * 0.3).to(dev, dtype)
    tgt = torch.randint(0, V, (N,), generator=g, device="cpu").to(dev)
    if ignore:
        tgt[::5] = -100
    return h_s, w_s, h_t, w_t, tgt


def _grads(fn, h_s, w_s, h_t, w_t, tgt, **kw):
    # a non-unit upstream gradient
    return forward_backward(fn, [h_s, w_s], [torch.tensor(0.7)], rest=[tgt], h_t=h_t, w_t=w_t, **kw)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_reference_matches_textbook_formulas_and_t2_gradient_scaling(T):
    h_s, w_s, h_t, w_t, tgt = _inputs(ignore=False)
    zs = (h_s @ w_s.t()).requires_grad_(True)
    zt = h_t @ w_t.t()
    lp, lq = F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1)
    fkl = F.kl_div(lp, lq, log_target=True, reduction="sum")  # KL(q || p)
    rkl = F.kl_div(lq, lp, log_target=True, reduction="sum")  # KL(p || q)
    beta = 0.3
    m = beta * lq.exp() + (1 - beta) * lp.exp()
    jsd = beta * (lq.exp() * (lq - m.log())).sum() + (1 - beta) * (lp.exp() * (lp - m.log())).sum()
    ce = F.cross_entropy(zs, tgt, reduction="sum")
    for kind, div in (("forward_kl", fkl), ("reverse_kl", rkl), ("jsd", jsd)):
        for alpha in (0.0, 0.4, 1.0):
            ref = kd_loss_reference(h_s, w_s, tgt, h_t=h_t, w_t=w_t, kind=kind, temperature=T, alpha=alpha, beta=beta)
            torch.testing.assert_close(ref, (1 - alpha) * ce + alpha * T * T * div, rtol=1e-5, atol=1e-4)
    # the T^2 factor makes the forward-KL gradient wrt the student logits T * (p - q): O(1) in T
    (gz,) = torch.autograd.grad(T * T * fkl, zs)
    torch.testing.assert_close(gz, T * (torch.softmax(zs / T, -1) - torch.softmax(zt / T, -1)), rtol=1e-4, atol=1e-6)


def test_jsd_limits():
    """JSD(beta) / beta -> KL(q || p) as beta -> 0 (the divergence alone: alpha = 1)."""
    h_s, w_s, h_t, w_t, tgt = _inputs(ignore=False, V=50)
    kw = dict(temperature=1.0, alpha=1.0)
    fkl = kd_loss_reference(h_s, w_s, tgt, h_t=h_t, w_t=w_t, kind="forward_kl", **kw)
    b = 1e-4
    small = kd_loss_reference(h_s.double(), w_s.double(), tgt, h_t=h_t.double(), w_t=w_t.double(), kind="jsd", beta=b, **kw)
    assert abs(float(small) / b - float(fkl)) / float(fkl) < 1e-2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [8, 1024])
def test_torch_chunked_matches_reference(kind, chunk):
    args = _inputs()
    kw = dict(kind=kind, temperature=2.0, alpha=0.6, beta=0.4)
    ref = _grads(kd_loss_reference, *args, **kw)
    ours = _grads(kd_loss_torch, *args, chunk_size=chunk, **kw)
    for what, a, b in zip(("loss", "grad_h", "grad_w"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{kind} {what}: {m}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference(kind, dtype):
    # no tl.dot in this kernel (the GEMMs are torch), so bf16 is exact-enough under the interpreter too
    args = _inputs(dtype=dtype, seed=1)
    kw = dict(kind=kind, temperature=2.0, alpha=0.5, beta=0.3, chunk_size=16)
    ref32 = _grads(kd_loss_reference, *[a.float() if a.is_floating_point() else a for a in args], **kw)
    eager = _grads(kd_loss_reference, *args, **kw)
    ours = _grads(kd_loss_triton, *args, **kw)
    for what, o, e, r in zip(("loss", "grad_h", "grad_w"), ours, eager, ref32):
        if dtype == torch.float32:
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, msg=lambda m: f"{kind} {what}: {m}")
        else:
            assert o.dtype == (torch.float32 if what == "loss" else dtype)
            # loss sums over ~30 rows: compare relative to its size
            sc = max(1.0, float(r.abs().max())) if what == "loss" else 1.0
            assert_within_eager_error(o / sc, e / sc, r / sc, dtype, f"{kind} {dtype} {what}")


def test_all_ignored_and_no_grad_path():
    h_s, w_s, h_t, w_t, tgt = _inputs()
    tgt[:] = -100
    loss, gh, gw = _grads(kd_loss_triton, h_s, w_s, h_t, w_t, tgt, chunk_size=16)
    assert float(loss) == 0 and gh.abs().max() == 0 and gw.abs().max() == 0
    h_s, w_s, h_t, w_t, tgt = _inputs()
    with torch.no_grad():
        a = kd_loss(h_s, w_s, tgt, h_t=h_t, w_t=w_t, backend="torch", kind="jsd")
    b = kd_loss_reference(h_s, w_s, tgt, h_t=h_t, w_t=w_t, kind="jsd")
    assert math.isclose(float(a), float(b), rel_tol=1e-5)


@pytest.mark.parametrize("fn", [kd_loss_torch, kd_loss_triton], ids=["torch", "triton"])
def test_target_outside_vocab_is_a_clear_error(fn):
    h_s, w_s, h_t, w_t, tgt = _inputs(V=300)
    tgt[3] = 300
    with pytest.raises(TargetOutOfRange, match=r"kd_loss: target id 300 is outside the vocabulary \[0, 300\)"):
        fn(h_s, w_s, tgt, h_t=h_t, w_t=w_t, chunk_size=16)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_row_blocks_and_budget_chunks(kind, monkeypatch):
    """Default chunking (memory budget) and the torch step's row blocks (3 rows each) match the reference."""
    monkeypatch.setattr(chunked_loss, "TEMP_ELEMENTS", 8 * 3 * 300)
    args = _inputs(V=300)
    kw = dict(kind=kind, temperature=2.0, alpha=0.6, beta=0.4)
    ref = _grads(kd_loss_reference, *args, **kw)
    ours = _grads(kd_loss_torch, *args, **kw)
    for what, a, b in zip(("loss", "grad_h", "grad_w"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{kind} {what}: {m}")
