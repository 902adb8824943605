"""Dequant-matmul kernels (int8 per channel, packed int4 groups) vs the fp32 reference, under the
Triton interpreter: the split-K GEMV (M <= 4) and the tiled GEMM (M > 4), odd N and K (K a multiple
of the group and K with a partial last group), fp32 and fp16 activations (bf16 for the GEMV, which
has no tl.dot)."""
import pytest
import torch

from llmstack.kernels import dequant_matmul as dq
from llmstack.kernels.dequant_matmul import (QuantKernelUnavailable, dequant_matmul, int4_matmul_reference,
                                             int4_matmul_torch, int4_matmul_triton, int8_matmul_reference,
                                             int8_matmul_torch, int8_matmul_triton, pack_int4, unpack_int4)
from llmstack.quant.rtn import quantize_int4, quantize_int8
from tests.kernels.tolerances import assert_within_eager_error

DTYPES = [torch.float32, torch.float16]


def _data(M, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = torch.get_default_device()  # CUDA under make test-gpu (tests/kernels/conftest.py)
    x = torch.randn(M, K, generator=g, device="cpu").to(dev, dtype)
    w = torch.randn(N, K, generator=g, device="cpu").to(dev) * 0.05
    return x, w


def test_pack_unpack_roundtrip_odd_k():
    g = torch.Generator().manual_seed(0)
    for K in (1, 7, 64, 129):
        q = torch.randint(0, 16, (5, K), generator=g, dtype=torch.uint8, device="cpu")
        packed = pack_int4(q)
        assert packed.shape == (5, (K + 1) // 2) and packed.dtype == torch.uint8
        assert torch.equal(unpack_int4(packed, K), q)


@pytest.mark.parametrize("M", [1, 3, 16, 67])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_kernel(M, dtype):
    N, K = 97, 160
    x, w = _data(M, N, K, dtype)
    t = quantize_int8(w)
    ref = int8_matmul_reference(x.float(), t["qweight"], t["scales"])
    ours = int8_matmul_triton(x, t["qweight"], t["scales"])
    assert ours.dtype == dtype and ours.shape == (M, N)
    eager = int8_matmul_torch(x, t["qweight"], t["scales"])
    assert_within_eager_error(ours, eager, ref, dtype, f"int8 M={M} {dtype}")


@pytest.mark.parametrize("M", [1, 5, 16, 70])
@pytest.mark.parametrize("K,group", [(192, 64), (256, 128), (200, 32), (136, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_kernel(M, K, group, dtype):
    N = 83
    x, w = _data(M, N, K, dtype, seed=M + K)
    t = quantize_int4(w, group_size=group)
    ref = int4_matmul_reference(x.float(), t["qweight"], t["scales"], t["zeros"], group_size=group, in_features=K)
    ours = int4_matmul_triton(x, t["qweight"], t["scales"], t["zeros"], group_size=group, in_features=K)
    eager = int4_matmul_torch(x, t["qweight"], t["scales"], t["zeros"], group_size=group, in_features=K)
    assert ours.dtype == dtype and ours.shape == (M, N)
    assert_within_eager_error(ours, eager, ref, dtype, f"int4 M={M} K={K} G={group} {dtype}")


@pytest.mark.skip(reason="bf16 tl.dot is wrong under the Triton interpreter (upstream triton issue 11584); "
                         "bf16 runs on GPU only")
def test_bf16_kernels():
    x, w = _data(4, 64, 128, torch.bfloat16)
    t = quantize_int8(w)
    ref = int8_matmul_reference(x.float(), t["qweight"], t["scales"])
    eager = int8_matmul_torch(x, t["qweight"], t["scales"])
    assert_within_eager_error(int8_matmul_triton(x, t["qweight"], t["scales"]), eager, ref, torch.bfloat16, "int8 bf16")


def test_batched_leading_dims_and_entry_point():
    x, w = _data(6, 48, 64, torch.float32)
    x = x.reshape(2, 3, 64)
    t = quantize_int4(w, group_size=32)
    a = dequant_matmul(x, t["qweight"], t["scales"], t["zeros"], bits=4, group_size=32, in_features=64, backend="triton")
    b = dequant_matmul(x, t["qweight"], t["scales"], t["zeros"], bits=4, group_size=32, in_features=64, backend="torch")
    assert a.shape == (2, 3, 48)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_int4_group_not_multiple_of_32_is_one_line_error():
    x, w = _data(2, 16, 48, torch.float32)
    t = quantize_int4(w, group_size=48)
    with pytest.raises(QuantKernelUnavailable, match="use backend=torch"):
        int4_matmul_triton(x, t["qweight"], t["scales"], t["zeros"], group_size=48, in_features=48)


def test_old_gpu_is_one_line_error_naming_the_fallback(monkeypatch):
    """A GPU without what the kernels need fails up front, naming backend=torch."""
    from llmstack.kernels.dequant_matmul import check_gpu_support
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla P100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (6, 0))
    with pytest.raises(QuantKernelUnavailable, match="sm_60: use backend=torch") as e:
        check_gpu_support(torch.device("cuda"), torch.float16)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    check_gpu_support(torch.device("cuda"), torch.float16)  # fine
    with pytest.raises(QuantKernelUnavailable, match="bf16 .* backend=torch"):
        check_gpu_support(torch.device("cuda"), torch.bfloat16)
    check_gpu_support(torch.device("cpu"), torch.bfloat16)  # CPU: nothing to check


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_split_k_gemv(M, dtype):
    N, K = 97, 520  # 2 column blocks, K in 5 steps of 128 (the last partial) over 3 splits
    assert dq._gemv_splits(N, K, 128, torch.device("cpu")) == (3, 256)
    x, w = _data(M, N, K, dtype, seed=M)
    t = quantize_int8(w)
    ours = int8_matmul_triton(x, t["qweight"], t["scales"])
    ref = int8_matmul_reference(x.float(), t["qweight"], t["scales"])
    eager = int8_matmul_torch(x, t["qweight"], t["scales"])
    assert ours.dtype == dtype and ours.shape == (M, N)
    assert_within_eager_error(ours, eager, ref, dtype, f"int8 GEMV M={M} {dtype}")


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("K,group", [(200, 32), (384, 128), (136, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_split_k_gemv(M, K, group, dtype):
    """Per-group scaling after the dot, K splits on group boundaries, a partial last group."""
    N = 70
    splits, per_split = dq._gemv_splits(N, K, min(128, group), torch.device("cpu"))
    assert splits > 1 and per_split % min(128, group) == 0  # splits end on K steps inside one group
    x, w = _data(M, N, K, dtype, seed=K + M)
    t = quantize_int4(w, group_size=group)
    ours = int4_matmul_triton(x, t["qweight"], t["scales"], t["zeros"], group_size=group, in_features=K)
    ref = int4_matmul_reference(x.float(), t["qweight"], t["scales"], t["zeros"], group_size=group, in_features=K)
    eager = int4_matmul_torch(x, t["qweight"], t["scales"], t["zeros"], group_size=group, in_features=K)
    assert ours.dtype == dtype and ours.shape == (M, N)
    assert_within_eager_error(ours, eager, ref, dtype, f"int4 GEMV M={M} K={K} G={group} {dtype}")


def test_gemv_and_gemm_paths_by_rows(monkeypatch):
    """M <= 4 takes the split-K GEMV, M = 5 the tiled GEMM; both give the same rows."""
    launched = []
    for name in ("_int8_gemv_kernel", "_int8_matmul_kernel"):
        kernel = getattr(dq, name)
        monkeypatch.setattr(dq, name, _Recording(kernel, name, launched))
    x, w = _data(5, 40, 96, torch.float32)
    t = quantize_int8(w)
    one = int8_matmul_triton(x[:4], t["qweight"], t["scales"])
    five = int8_matmul_triton(x, t["qweight"], t["scales"])
    assert launched == ["_int8_gemv_kernel", "_int8_matmul_kernel"]
    torch.testing.assert_close(one, five[:4], atol=1e-5, rtol=1e-5)


class _Recording:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]
