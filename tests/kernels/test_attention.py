"""FlashAttention-2 Triton kernel vs the fp32 torch reference: forward and dq/dk/dv.

On CPU this runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1). On a
GPU machine run it with TRITON_INTERPRET=0 to test the compiled kernels (bf16 cases included).
"""
import ctypes
import glob
import os
import subprocess
import sys

import pytest
import torch

from llmstack.kernels.attention import attention_reference, attention_triton
from tests.kernels.grads import forward_backward
from tests.kernels.tolerances import assert_close, assert_within_eager_error

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("attention_triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

BF16_INTERPRETER_SKIP = ("bf16 arithmetic is wrong under the Triton interpreter (upstream triton issue 11584: "
                         "bf16 held as raw uint16 bits); bf16 cases run on GPU")


def _openblas_set_threads(n):
    """The interpreter runs tl.dot as small numpy matmuls; a multi-threaded OpenBLAS on a busy
    2-core machine makes each one ~100x slower. Returns the previous count (None if unknown)."""
    import numpy
    libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "*openblas*.so*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, set_ in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                          ("openblas_get_num_threads", "openblas_set_num_threads")):
            if hasattr(lib, get) and hasattr(lib, set_):
                prev = getattr(lib, get)()
                getattr(lib, set_)(ctypes.c_int(n))
                return lambda: getattr(lib, set_)(ctypes.c_int(prev))
    return None


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_numpy_blas():
    restore = _openblas_set_threads(1) if INTERPRET else None
    yield
    if restore is not None:
        restore()


def _docs(B, T, n_docs, gen):
    """[B, T] doc ids: n_docs contiguous documents of uneven random lengths, different per row."""
    rows = []
    for _ in range(B):
        n = min(n_docs, T)
        cuts = (torch.randperm(T - 1, generator=gen, device="cpu")[: n - 1] + 1 if n > 1
                else torch.empty(0, dtype=torch.long, device="cpu"))
        ids = torch.zeros(T, dtype=torch.long, device="cpu")
        for c in cuts.tolist():
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows).to(DEVICE)


def _inputs(B, T, H, Hkv, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, device="cpu")
    k = torch.randn(B, T, Hkv, D, generator=gen, device="cpu")
    v = torch.randn(B, T, Hkv, D, generator=gen, device="cpu")
    do = torch.randn(B, T, H, D, generator=gen, device="cpu")
    return [t.to(DEVICE, dtype) for t in (q, k, v)], do.to(DEVICE, dtype), gen


def _run(fn, q, k, v, do, **kw):
    return forward_backward(fn, [q, k, v], [do], **kw)


def _check(B, T, H, Hkv, D, causal, n_docs, dtype, scale=None, seed=0):
    (q, k, v), do, gen = _inputs(B, T, H, Hkv, D, dtype, seed)
    doc_ids = _docs(B, T, n_docs, gen) if n_docs else None
    kw = dict(causal=causal, scale=scale, doc_ids=doc_ids)
    ours = _run(attention_triton, q, k, v, do, **kw)
    ref = _run(attention_reference, q.float(), k.float(), v.float(), do.float(), **kw)
    names = ("out", "dq", "dk", "dv")
    for name, a in zip(names, ours):
        assert a.dtype == dtype, f"{name} dtype {a.dtype}"
    assert ours[0].shape == (B, T, H, D) and ours[2].shape == (B, T, Hkv, D)
    if dtype == torch.float32:
        for name, a, r in zip(names, ours, ref):
            assert_close(a, r, dtype, name)
    else:
        # Flash-attention's rule: within ERROR_FACTOR x the error of eager torch in the same dtype.
        eager = _run(attention_reference, q, k, v, do, **kw)
        for name, a, e, r in zip(names, ours, eager, ref):
            assert torch.isfinite(a).all(), name
            assert_within_eager_error(a, e, r, dtype, name)


# (B, T, H, Hkv, D, causal, n_docs): GQA ratio H // Hkv in {1, 2, 4}; T in {1, 17, 128, 257};
# D in {64, 128} plus padded head dims 32 / 48 / 160; n_docs = 0 means no doc_ids.
CASES = [
    (1, 1, 2, 1, 64, True, 0),
    (1, 1, 2, 2, 128, False, 0),
    (2, 17, 4, 2, 64, True, 2),
    (1, 17, 4, 4, 128, False, 0),
    (1, 17, 4, 1, 64, False, 3),
    (1, 128, 4, 1, 64, True, 0),
    (2, 128, 2, 1, 128, True, 3),
    (1, 128, 2, 2, 64, False, 2),
    (2, 40, 4, 2, 48, True, 3),
    (1, 33, 2, 1, 32, False, 0),
    (1, 70, 4, 2, 160, True, 2),     # head dim > 128: dK and dV in two sweeps, padded to 256
]
SLOW_CASES = [
    (1, 257, 4, 2, 64, True, 3),
    (2, 257, 2, 1, 128, False, 2),
    (1, 257, 4, 4, 128, True, 0),
    (1, 257, 4, 1, 48, False, 0),
]


def _case_id(c):
    B, T, H, Hkv, D, causal, n_docs = c
    return f"B{B}-T{T}-H{H}-kv{Hkv}-D{D}-{'causal' if causal else 'full'}-docs{n_docs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attention_matches_reference(case, dtype):
    _check(*case, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", SLOW_CASES, ids=_case_id)
def test_attention_matches_reference_large(case, dtype):
    _check(*case, dtype=dtype)


@pytest.mark.parametrize("case", [CASES[2], CASES[6], SLOW_CASES[0]], ids=_case_id)
def test_attention_bf16(case):
    if INTERPRET:
        pytest.skip(BF16_INTERPRETER_SKIP)
    _check(*case, dtype=torch.bfloat16)


def test_custom_scale():
    _check(1, 40, 2, 1, 64, True, 2, torch.float32, scale=0.3)


def test_strided_inputs_no_copy_needed():
    """q/k/v as views of a fused [B, T, H + 2 Hkv, D] projection (non-contiguous, like model.py
    before its .view) give the same result as contiguous inputs."""
    B, T, H, Hkv, D = 1, 50, 4, 2, 32
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=gen, device="cpu").to(DEVICE)
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
    assert not q.is_contiguous()
    do = torch.randn(B, T, H, D, generator=gen, device="cpu").to(DEVICE)
    ours = _run(attention_triton, q, k, v, do, causal=True)
    ref = _run(attention_reference, q, k, v, do, causal=True)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert_close(a, r, torch.float32, name)


def test_broadcast_grad_output():
    """out.sum().backward() hands the kernel an expanded (all-zero-stride) grad."""
    (q, k, v), _, _ = _inputs(1, 20, 2, 1, 64, torch.float32, seed=4)
    grads = []
    for fn in (attention_triton, attention_reference):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        fn(qq, kk, vv, causal=True).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for name, a, r in zip(("dq", "dk", "dv"), *grads):
        assert_close(a, r, torch.float32, name)


def test_cpu_without_interpreter_is_an_error():
    code = ("import torch\n"
            "from llmstack.kernels.attention import attention_triton\n"
            "x = torch.randn(1, 4, 2, 16)\n"
            "try:\n"
            "    attention_triton(x, x, x)\n"
            "except RuntimeError as e:\n"
            "    assert 'TRITON_INTERPRET' in str(e), e\n"
            "    print('raised')\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "raised" in res.stdout, res.stdout + res.stderr


def test_backward_is_deterministic():
    (q, k, v), do, gen = _inputs(1, 70, 4, 1, 64, torch.float32, seed=5)
    doc_ids = _docs(1, 70, 3, gen)
    a = _run(attention_triton, q, k, v, do, doc_ids=doc_ids)
    b = _run(attention_triton, q, k, v, do, doc_ids=doc_ids)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_doc_ids_isolate_documents():
    """With packed documents each document's output equals attention over that document alone."""
    B, T, H, D = 1, 48, 2, 64
    (q, k, v), _, _ = _inputs(B, T, H, H, D, torch.float32, seed=7)
    doc_ids = torch.tensor([[0] * 20 + [1] * 5 + [2] * 23], device=DEVICE)
    out = attention_triton(q, k, v, doc_ids=doc_ids)
    for lo, hi in ((0, 20), (20, 25), (25, 48)):
        alone = attention_triton(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi])
        assert_close(out[:, lo:hi], alone, torch.float32, f"doc {lo}:{hi}")


@pytest.mark.parametrize("case", [(2, 100, 4, 2, 64, True, 3), (1, 128, 2, 1, 32, False, 0)], ids=_case_id)
def test_tma_forward(case, monkeypatch):
    """The Hopper forward reads Q/K/V through [B, T, heads*D] TMA descriptors (zero-filled past T).
    Taken on its own on sm_90+; forced here so the interpreter (and any GPU) runs it too."""
    import llmstack.kernels.attention as A
    if A.K.TensorDescriptor is None:
        pytest.skip("this triton has no host-side TMA descriptors")
    if not INTERPRET and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9.0")
    taken = []
    monkeypatch.setattr(A, "_tma_ok", lambda q, k, v, meta: taken.append(meta["EVEN_D"]) or meta["EVEN_D"])
    _check(*case, dtype=torch.float16)
    assert taken and all(taken)


def test_doc_bounds():
    """Each token's document start/end; -1 for a row whose ids are not non-decreasing."""
    from llmstack.kernels.attention import _doc_bounds
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 4, 4, 4, 4], [7, 7, 7, 7, 7, 7]])
    b = _doc_bounds(ids)
    assert b.dtype == torch.int32 and b.shape == (3, 2, 6)
    assert b[0, 0].tolist() == [0, 0, 0, 3, 3, 5] and b[0, 1].tolist() == [3, 3, 3, 5, 5, 6]
    assert (b[1] == -1).all()
    assert b[2, 0].tolist() == [0] * 6 and b[2, 1].tolist() == [6] * 6


@pytest.mark.parametrize("case", [
    (1, 200, 4, 2, 64, 9),      # many short documents: most key blocks skipped
    (2, 256, 2, 1, 32, 2),      # long documents: unmasked blocks inside a document, masked at its start
], ids=["short-docs", "long-docs"])
def test_packed_documents_many_blocks(case):
    B, T, H, Hkv, D, n_docs = case
    _check(B, T, H, Hkv, D, True, n_docs, torch.float32, seed=11)


def test_doc_ids_not_sorted():
    """Ids that come back (0, 1, 0): no block skipping, the same-id mask alone (as the reference)."""
    B, T, H, D = 1, 96, 2, 32
    (q, k, v), do, _ = _inputs(B, T, H, 1, D, torch.float32, seed=12)
    doc_ids = torch.tensor([[0] * 30 + [1] * 40 + [0] * 26], device=DEVICE)
    ours = _run(attention_triton, q, k, v, do, doc_ids=doc_ids)
    ref = _run(attention_reference, q, k, v, do, doc_ids=doc_ids)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert_close(a, r, torch.float32, name)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_blocks_of_earlier_documents_are_not_read():
    """Key blocks wholly before a query block's document are skipped, not masked: NaNs in an
    earlier document's K/V would reach the output through 0 * NaN if those blocks were read.
    The document boundary (128) falls on a block boundary for every config's block sizes."""
    B, T, H, D = 1, 256, 2, 32
    (q, k, v), do, _ = _inputs(B, T, H, 1, D, torch.float32, seed=13)
    doc_ids = torch.tensor([[0] * 128 + [1] * 128], device=DEVICE)
    k, v = k.clone(), v.clone()
    k[:, :128] = float("nan")
    v[:, :128] = float("nan")
    ours = _run(attention_triton, q, k, v, do, doc_ids=doc_ids)
    ref = _run(attention_reference, q[:, 128:], k[:, 128:], v[:, 128:], do[:, 128:])
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert_close(a[:, 128:], r, torch.float32, name)


@pytest.mark.slow
def test_int64_offsets_past_2_pow_31_elements():
    """B*T*H*D = 2^31: batch and head offsets overflow int32 unless computed in int64 (GPU only:
    4 GiB per bf16 tensor). The last batch row is checked against the reference on its own."""
    if INTERPRET:
        pytest.skip("needs ~10 GiB of GPU memory; run with TRITON_INTERPRET=0 on a GPU")
    B, T, H, Hkv, D = 64, 4096, 64, 8, 128
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        out = attention_triton(q, k, v, causal=True)[-1:, -256:]
        ref = attention_reference(q[-1:], k[-1:], v[-1:], causal=True)[:, -256:]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q.double(), k.double(), v.double(), {}), "dtype"),
    (lambda q, k, v: (q, k.half(), v, {}), "share a dtype"),
    (lambda q, k, v: (q[..., :3, :], k, v, {}), "multiple of kv heads"),
    (lambda q, k, v: (q, k[:, :5], v[:, :5], {}), "k/v must be"),
    (lambda q, k, v: (q[0], k[0], v[0], {}), "4-D"),
    (lambda q, k, v: (q, k, v, {"doc_ids": torch.zeros(1, 3, dtype=torch.long, device=DEVICE)}), "doc_ids"),
    (lambda q, k, v: (q, k, v, {"doc_ids": torch.zeros(1, 8, device=DEVICE)}), "integer"),
    (lambda q, k, v: (torch.zeros(1, 8, 4, 300, device=DEVICE), torch.zeros(1, 8, 2, 300, device=DEVICE),
                      torch.zeros(1, 8, 2, 300, device=DEVICE), {}), "head dim"),
])
def test_rejects_unsupported_inputs(bad, match):
    (q, k, v), _, _ = _inputs(1, 8, 4, 2, 64, torch.float32)
    q, k, v, kw = bad(q, k, v)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        attention_triton(q, k, v, **kw)
