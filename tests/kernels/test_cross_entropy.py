"""Fused linear + cross-entropy: the chunked torch path and the Triton path (interpreter on CPU)
against the naive reference that materialises the logits."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmstack.errors import UserError
from llmstack.kernels import chunked_loss
from llmstack.kernels.chunked_loss import (LOGITS_BUDGET_BYTES, MAX_CHUNK_TOKENS, MIN_CHUNK_TOKENS, TargetOutOfRange,
                                           accumulate_mm_, loss_chunk_tokens)
from llmstack.kernels.cross_entropy import (linear_cross_entropy_reference, linear_cross_entropy_torch,
                                            linear_cross_entropy_triton)
from tests.kernels.grads import forward_backward
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
    return forward_backward(fn, [h, w], rest=[t], **kw)


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

@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_larger_vocab_many_chunks(impl):
    h, w, t = make_inputs(150, 2000, D=64, ignore_every=7)
    check_fp32(impl, h, w, t, reduction="mean", chunk_size=64, z_loss=1e-4, label_smoothing=0.1, softcap=15.0)


# --- the shared chunk driver: bounds checks, chunk sizing, in-place buffers -----------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [-1, 100, 10**6])
def test_target_outside_vocab_is_a_clear_error(impl, bad):
    h, w, t = make_inputs(9, 100, ignore_every=3)
    t[4] = bad
    with pytest.raises(TargetOutOfRange, match=rf"target id {bad} is outside the vocabulary \[0, 100\)"):
        IMPLS[impl](h, w, t, chunk_size=4)
    assert issubclass(TargetOutOfRange, UserError)


def test_kernel_never_reads_a_target_outside_the_row():
    """Called directly (no launcher check), the kernel gives NaN loss and a zero row for a target
    outside [0, V), and leaves the other rows exact."""
    from llmstack.kernels.cross_entropy import _softmax_grad_triton
    V = 300
    logits = torch.randn(4, V)
    ref_logits = logits.clone()
    tgt = torch.tensor([5, V + 7, -100, -3])
    scale = torch.ones(())
    loss_rows = []
    for r in range(4):  # one row per call: the NaN row must not hide the others' values
        loss_rows.append(_softmax_grad_triton(logits[r:r + 1], tgt[r:r + 1], scale, ignore_index=-100, z_loss=0.0,
                                              label_smoothing=0.0, softcap=None))
    assert torch.isnan(loss_rows[1]) and torch.isnan(loss_rows[3]) and loss_rows[2].item() == 0.0
    assert torch.count_nonzero(logits[1:]) == 0
    expected = torch.nn.functional.cross_entropy(ref_logits[:1], tgt[:1], reduction="sum")
    torch.testing.assert_close(loss_rows[0], expected)
    torch.testing.assert_close(logits[0], torch.softmax(ref_logits[0], -1) - torch.nn.functional.one_hot(tgt[0], V))


def test_chunk_tokens_follow_the_memory_budget():
    # GPU: 1k-2k tokens at a 128k vocabulary (fp32 / bf16 logits); CPU: 8x smaller; bounded both sides
    assert loss_chunk_tokens(128256, 4) == 1024 and loss_chunk_tokens(128256, 2) == 2048
    assert loss_chunk_tokens(32000, 4) == 4096 and loss_chunk_tokens(32000, 2) == 8192
    assert loss_chunk_tokens(128256, 4, "cpu") == 128 and loss_chunk_tokens(32768, 4, "cpu") == 512
    assert loss_chunk_tokens(512, 4) == MAX_CHUNK_TOKENS and loss_chunk_tokens(10**9, 2) == MIN_CHUNK_TOKENS
    for dev in ("cuda", "cpu"):
        for v in (1000, 32768, 50257, 128256, 262144):
            c = loss_chunk_tokens(v, 2, dev)
            assert c & (c - 1) == 0 and (c * v * 2 <= LOGITS_BUDGET_BYTES[dev] or c == MIN_CHUNK_TOKENS)


def test_default_chunking_is_the_budget(monkeypatch):
    """chunk_size=0 runs chunks of loss_chunk_tokens(V, itemsize, device) tokens."""
    seen = []
    real = chunked_loss.chunked_linear_loss
    monkeypatch.setattr(chunked_loss, "LOGITS_BUDGET_BYTES", {"cpu": 8 * 100 * 4, "cuda": 1})
    from llmstack.kernels import cross_entropy

    def spy(h, weight, step, **kw):
        seen.append(kw["chunk_tokens"])

        def counting(z, lo, hi):
            seen.append(hi - lo)
            return step(z, lo, hi)
        return real(h, weight, counting, **kw)

    monkeypatch.setattr(cross_entropy, "chunked_linear_loss", spy)
    h, w, t = make_inputs(200, 100)
    loss = linear_cross_entropy_torch(h, w, t, reduction="mean")
    assert seen[0] == 0 and seen[1:] == [64] * 3 + [8], seen  # budget 8 rows -> MIN_CHUNK_TOKENS
    assert_close(loss, linear_cross_entropy_reference(h, w, t, reduction="mean"), torch.float32, "budget chunks")


class _Allocations(TorchDispatchMode):
    """(shape, dtype) of every tensor an aten op returns (views and in-place results included)."""

    def __init__(self):
        super().__init__()
        self.out = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        for r in (res if isinstance(res, (tuple, list)) else [res]):
            if isinstance(r, torch.Tensor) and not func._schema.is_mutable and func not in _VIEWS:
                self.out.append((tuple(r.shape), r.dtype, str(func)))
        return res


_VIEWS = {torch.ops.aten.slice.Tensor, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
          torch.ops.aten.view.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default,
          torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.select.int,
          torch.ops.aten.expand.default}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_vocab_sized_temporaries(impl, dtype, monkeypatch):
    """The only [V, D] tensors made are the fp32 grad_W accumulator (and grad_W in a bf16 weight's
    dtype at the end), and the only [c, V] ones the reused logits buffer in the GEMM dtype: no
    per-chunk [V, D] product, no fp32 copy of bf16 logits (the Triton step). The temporaries'
    element budget is shrunk so that it is smaller than [V, D] here (several slabs and row blocks)."""
    N, V, D, chunk = 48, 700, 16, 16
    monkeypatch.setattr(chunked_loss, "TEMP_ELEMENTS", 4000)
    h, w, t = make_inputs(N, V, D=D, dtype=dtype)
    h.requires_grad_(True)
    w.requires_grad_(True)
    with _Allocations() as rec:
        loss = IMPLS[impl](h, w, t, chunk_size=chunk)
        loss.backward()
    big_w = [(s, d, f) for s, d, f in rec.out if s == (V, D)]
    expected = [((V, D), torch.float32)] + ([((V, D), torch.bfloat16)] if dtype == torch.bfloat16 else [])
    assert sorted((s, str(d)) for s, d, _ in big_w) == sorted((s, str(d)) for s, d in expected), big_w
    logits_sized = [(s, d, f) for s, d, f in rec.out if len(s) == 2 and s[1] == V]
    if impl == "triton":
        assert [(s, d) for s, d, _ in logits_sized] == [((chunk, V), dtype)], logits_sized
    else:  # the logits buffer, then the torch step's fp32 row blocks within the element budget
        assert logits_sized[0][:2] == ((chunk, V), dtype)
        assert all(s[0] * s[1] <= max(V, 4000) for s, _, _ in logits_sized[1:]), logits_sized


def test_accumulate_mm_in_place_fp32_from_bf16(monkeypatch):
    monkeypatch.setattr(chunked_loss, "TEMP_ELEMENTS", 7 * 64)  # 64-row slabs
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 20, generator=g).bfloat16()
    b = torch.randn(20, 7, generator=g).bfloat16()
    acc = torch.randn(300, 7, generator=g)
    expected = acc + a.float() @ b.float()
    ptr = acc.data_ptr()
    accumulate_mm_(acc, a, b)
    assert acc.data_ptr() == ptr and acc.dtype == torch.float32
    # bf16 GEMM output rounding (per slab) only: well inside bf16's own resolution
    torch.testing.assert_close(acc, expected, atol=0.05, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_step_in_row_blocks(dtype, monkeypatch):
    """The torch step's row blocks (2 rows each here) give the same numbers as one block."""
    monkeypatch.setattr(chunked_loss, "TEMP_ELEMENTS", 2 * 257)
    h, w, t = make_inputs(37, 257, ignore_every=4, dtype=dtype)
    kw = dict(chunk_size=16, z_loss=1e-2, label_smoothing=0.2, softcap=3.0, reduction="mean")
    if dtype == torch.float32:
        check_fp32("torch", h * 3, w, t, **kw)
        return
    ours = loss_and_grads(linear_cross_entropy_torch, h, w, t, **kw)
    eager = loss_and_grads(linear_cross_entropy_reference, h, w, t, **kw)
    ref = loss_and_grads(linear_cross_entropy_reference, h.float(), w.float(), t, **kw)
    for name, a, b, c in zip(("loss", "grad_h", "grad_W"), ours, eager, ref):
        assert_within_eager_error(a, b, c, dtype, what=f"row blocks bf16 {name}")
