"""Fused linear + cross-entropy: the chunked torch path and the Triton path (interpreter on CPU)
against the naive reference that materialises the logits."""
import pytest
import torch

from llmstack.kernels import KernelUnavailable, _load, resolve_ops
from llmstack.kernels.cross_entropy import (linear_cross_entropy_reference, linear_cross_entropy_torch,
                                            linear_cross_entropy_triton)
from tests.kernels.tolerances import ATOL, RTOL, assert_close, assert_within_eager_error

IMPLS = {"torch": linear_cross_entropy_torch, "triton": linear_cross_entropy_triton}
IGNORE = -100


def make_inputs(N, V, D=32, dtype=torch.float32, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, device="cpu") / D ** 0.25
    w = torch.randn(V, D, generator=g, device="cpu") / D ** 0.25
    t = torch.randint(0, V, (N,), generator=g, device="cpu")
    if ignore_every:
        t[::ignore_every] = IGNORE
    dev = torch.get_default_device()  # CUDA under make test-gpu (tests/kernels/conftest.py)
    return h.to(dev, dtype), w.to(dev, dtype), t.to(dev)


def loss_and_grads(fn, h, w, t, **kw):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(h, w, t, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def check_fp32(impl, h, w, t, **kw):
    ours = loss_and_grads(IMPLS[impl], h, w, t, **kw)
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, t, **kw)
    assert ours[0].dtype == torch.float32 and ours[0].dim() == 0
    for name, a, b in zip(("loss", "grad_h", "grad_W"), ours, ref):
        # the summed loss grows with N: compare it relative to its size
        atol = ATOL[torch.float32] * (max(1.0, b.abs().item()) if name == "loss" else 1.0)
        torch.testing.assert_close(a, b, atol=atol, rtol=RTOL[torch.float32], msg=lambda m: f"{impl} {name}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("N,V,chunk", [(1, 100, 32), (37, 257, 32), (130, 1000, 64)])
def test_matches_reference(impl, reduction, N, V, chunk):
    h, w, t = make_inputs(N, V, ignore_every=5 if N > 1 else 0)
    check_fp32(impl, h, w, t, reduction=reduction, chunk_size=chunk)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", [dict(z_loss=1e-3), dict(label_smoothing=0.1), dict(softcap=2.0),
                                  dict(z_loss=1e-2, label_smoothing=0.2, softcap=3.0, reduction="mean")],
                         ids=["z_loss", "label_smoothing", "softcap", "all"])
def test_options(impl, opts):
    h, w, t = make_inputs(37, 257, ignore_every=4)
    h = h * 3  # larger logits so softcap's tanh saturates on some entries
    check_fp32(impl, h, w, t, chunk_size=16, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_ignored(impl, reduction):
    h, w, t = make_inputs(9, 100, ignore_every=0)
    t[:] = IGNORE
    loss, gh, gw = loss_and_grads(IMPLS[impl], h, w, t, reduction=reduction, chunk_size=4, z_loss=1e-3,
                                  label_smoothing=0.1)
    assert loss.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    check_fp32(impl, h, w, t, reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index_custom(impl):
    h, w, t = make_inputs(20, 100, ignore_every=0)
    t[3:7] = 0  # class 0 used as the ignore index
    check_fp32(impl, h, w, t, ignore_index=0, reduction="mean", chunk_size=8)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_eager_error(impl, dtype):
    """Matmuls in fp16/bf16 (torch.mm; the Triton kernel only sees fp32 logits, so the
    interpreter's bf16 problem does not arise), softmax/loss in fp32, grad_W summed in fp32."""
    h, w, t = make_inputs(70, 257, D=64, dtype=dtype, ignore_every=6)
    kw = dict(reduction="mean", chunk_size=16, z_loss=1e-4, label_smoothing=0.05)
    ours = loss_and_grads(IMPLS[impl], h, w, t, **kw)
    eager = loss_and_grads(linear_cross_entropy_reference, h, w, t, **kw)
    ref = loss_and_grads(linear_cross_entropy_reference, h.float(), w.float(), t, **kw)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    for name, a, b, c in zip(("loss", "grad_h", "grad_W"), ours, eager, ref):
        assert_within_eager_error(a, b, c, dtype, what=f"{impl} {dtype} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_bf16_keeps_fp32_weight_grad(impl):
    h, w, t = make_inputs(33, 100, D=32)
    kw = dict(reduction="mean", chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(IMPLS[impl], h, w, t, **kw)
        eager = loss_and_grads(linear_cross_entropy_reference, h, w, t, **kw)
    ref = loss_and_grads(linear_cross_entropy_reference, h, w, t, **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32 and ours[2].dtype == torch.float32
    for name, a, b, c in zip(("loss", "grad_h", "grad_W"), ours, eager, ref):
        assert_within_eager_error(a, b, c, torch.bfloat16, what=f"{impl} autocast {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_output_scaling_and_partial_grads(impl):
    h, w, t = make_inputs(25, 100)
    fn = IMPLS[impl]
    hh = h.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    (3.0 * fn(hh, ww, t, chunk_size=8)).backward()
    _, gh, gw = loss_and_grads(linear_cross_entropy_reference, h, w, t)
    assert_close(hh.grad, 3.0 * gh, torch.float32, "3x grad_h")
    assert_close(ww.grad, 3.0 * gw, torch.float32, "3x grad_W")
    # frozen head (e.g. LoRA): only h needs a gradient
    hh = h.clone().requires_grad_(True)
    fn(hh, w, t, chunk_size=8).backward()
    assert_close(hh.grad, gh, torch.float32, "grad_h with frozen W")
    # no grad at all: same loss, no graph
    with torch.no_grad():
        loss = fn(h, w, t, chunk_size=8)
    assert not loss.requires_grad
    assert_close(loss, linear_cross_entropy_reference(h, w, t), torch.float32, "no-grad loss")


def test_triton_refuses_cpu_without_interpreter(monkeypatch):
    h, w, t = make_inputs(4, 100)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        linear_cross_entropy_triton(h, w, t)


def test_bad_reduction():
    h, w, t = make_inputs(4, 100)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy_torch(h, w, t, reduction="none")


def _saved_numels(fn, h, w, t, **kw):
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(h, w, t, **kw)
    loss.backward()
    return sizes


def test_chunked_never_saves_full_logits():
    N, V, D = 4096, 8192, 64
    h, w, t = make_inputs(N, V, D=D)
    saved = _saved_numels(linear_cross_entropy_torch, h, w, t, chunk_size=512)
    # only grad_h [N, D] and grad_W [V, D] are kept for backward
    assert sorted(saved) == sorted([N * D, V * D]), saved
    assert max(saved) < N * V
    # the hook does see logits-sized tensors when the naive path is used
    n_small = 256
    naive = _saved_numels(linear_cross_entropy_reference, h[:n_small], w, t[:n_small])
    assert max(naive) >= n_small * V


def test_dispatch():
    assert _load("linear_cross_entropy", "triton") is linear_cross_entropy_triton
    assert _load("linear_cross_entropy", "torch") is linear_cross_entropy_torch
    assert resolve_ops("torch", "cpu").linear_cross_entropy is linear_cross_entropy_torch
    try:
        ops = resolve_ops("triton", "cpu")
    except KernelUnavailable as e:  # another op's Triton kernel (other file) not written yet
        pytest.skip(f"resolve_ops('triton', 'cpu') incomplete: {e}")
    assert ops.linear_cross_entropy is linear_cross_entropy_triton


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_larger_vocab_many_chunks(impl):
    h, w, t = make_inputs(150, 2000, D=64, ignore_every=7)
    check_fp32(impl, h, w, t, reduction="mean", chunk_size=64, z_loss=1e-4, label_smoothing=0.1, softcap=15.0)
