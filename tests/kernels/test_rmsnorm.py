"""RMSNorm Triton kernels (forward, dx, dW; fused residual variant) against the fp32 reference,
run through the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1)."""

import pytest
import torch

from llmstack.kernels.rmsnorm import (rms_norm_reference, rms_norm_residual_reference, rms_norm_residual_torch,
                                      rms_norm_residual_triton, rms_norm_torch, rms_norm_triton)
from tests.kernels.grads import forward_backward
from tests.kernels.tolerances import assert_close
from tests.kernels.tolerances import compare as _compare

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


EPS = 1e-5


def _eager_lowp(x, w, eps):
    """What eager torch does when everything stays in the low-precision dtype."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _grads(fn, inputs, grad_outs):
    res = forward_backward(fn, inputs, grad_outs)
    return list(res[:-len(inputs)]), list(res[-len(inputs):])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (17, 100), (257, 64), (2, 3, 128), (5, 1000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_forward_backward(dtype, shape):
    torch.manual_seed(0)
    N = shape[-1]
    x = torch.randn(shape, dtype=dtype)
    w = (1 + 0.2 * torch.randn(N)).to(dtype)
    gy = torch.randn(shape, dtype=dtype)
    (y,), (dx, dw) = _grads(lambda a, b: rms_norm_triton(a, b, EPS), [x, w], [gy])
    (yr,), (dxr, dwr) = _grads(lambda a, b: rms_norm_reference(a, b, EPS), [x.float(), w.float()], [gy])
    (ye,), (dxe, dwe) = _grads(lambda a, b: _eager_lowp(a, b, EPS), [x, w], [gy])
    assert y.dtype == dtype and y.shape == x.shape and dx.dtype == dtype and dw.dtype == dtype
    _compare(y, ye, yr, dtype, "y")
    _compare(dx, dxe, dxr, dtype, "dx")
    _compare(dw, dwe, dwr, dtype, "dW")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rms_norm_mixed_precision_weight(dtype):
    """Low-precision activations with an fp32 weight (the usual mixed-precision layout)."""
    torch.manual_seed(1)
    x = torch.randn(33, 96, dtype=dtype)
    w = 1 + 0.2 * torch.randn(96)
    gy = torch.randn(33, 96, dtype=dtype)
    (y,), (dx, dw) = _grads(lambda a, b: rms_norm_triton(a, b, EPS), [x, w], [gy])
    (yr,), (dxr, dwr) = _grads(lambda a, b: rms_norm_reference(a, b, EPS), [x.float(), w], [gy])
    (ye,), (dxe, dwe) = _grads(lambda a, b: _eager_lowp(a, b.to(dtype), EPS), [x, w], [gy])
    assert y.dtype == dtype and dw.dtype == torch.float32
    _compare(y, ye, yr, dtype, "y")
    _compare(dx, dxe, dxr, dtype, "dx")
    _compare(dw, dwe, dwr, dtype, "dW")


def test_rms_norm_statistics_in_fp32():
    """Sum of squares that overflows fp16 (eager fp16 gives inf/0): ours keeps fp32 statistics."""
    x = (300 + 10 * torch.randn(4, 1000)).half()
    w = torch.ones(1000, dtype=torch.float16)
    y = rms_norm_triton(x, w, EPS)
    assert not torch.isfinite(x.pow(2).sum(-1)).all()  # the trap is real
    assert torch.isfinite(y).all()
    assert_close(y, rms_norm_reference(x.float(), w.float(), EPS), torch.float16, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (17, 100), (2, 129, 64)], ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_residual(dtype, shape):
    torch.manual_seed(2)
    N = shape[-1]
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w = (1 + 0.2 * torch.randn(N)).to(dtype)
    gy, gs = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)

    def ref(a, b, c):
        s = a + b
        return rms_norm_reference(s, c, EPS), s

    def eager(a, b, c):
        s = a + b
        return _eager_lowp(s, c, EPS), s

    (y, s), (dx, dr, dw) = _grads(lambda a, b, c: rms_norm_residual_triton(a, b, c, EPS), [x, r, w], [gy, gs])
    (yr, sr), (dxr, drr, dwr) = _grads(ref, [x.float(), r.float(), w.float()], [gy, gs])
    (ye, se), (dxe, dre, dwe) = _grads(eager, [x, r, w], [gy, gs])
    assert y.dtype == s.dtype == dtype
    _compare(y, ye, yr, dtype, "normed")
    _compare(s, se, sr, dtype, "x + residual")
    _compare(dx, dxe, dxr, dtype, "dx")
    _compare(dr, dre, drr, dtype, "dresidual")
    _compare(dw, dwe, dwr, dtype, "dW")
    assert dx.data_ptr() != dr.data_ptr()


def test_rms_norm_residual_only_normed_output_used():
    torch.manual_seed(3)
    x, r = torch.randn(9, 100), torch.randn(9, 100)
    w = 1 + 0.2 * torch.randn(100)
    gy = torch.randn(9, 100)
    (y,), (dx, dr, dw) = _grads(lambda a, b, c: rms_norm_residual_triton(a, b, c, EPS)[0], [x, r, w], [gy])
    (yr,), (dxr, drr, dwr) = _grads(lambda a, b, c: rms_norm_reference(a + b, c, EPS), [x, r, w], [gy])
    for ours, ref, what in ((y, yr, "y"), (dx, dxr, "dx"), (dr, drr, "dres"), (dw, dwr, "dW")):
        assert_close(ours, ref, torch.float32, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_torch_path_matches_reference_fwd_bwd(dtype):
    x, w, gy = torch.randn(3, 5, 64).to(dtype), torch.randn(64), torch.randn(3, 5, 64)
    outs = []
    for fn in (rms_norm_torch, rms_norm_reference):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww, EPS)
        (y.float() * gy).sum().backward()
        outs.append((y.detach(), xx.grad, ww.grad))
    for a, b in zip(*outs):
        assert_close(a, b, dtype, "rms_norm_torch")


def test_rms_norm_rejects_bad_input():
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(torch.randn(3, 64), torch.randn(32), EPS)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm_triton(torch.randn(3, 64).double(), torch.randn(64), EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_residual_triton(torch.randn(3, 64), torch.randn(3, 32), torch.randn(64), EPS)


def test_backward_partial_dw_over_many_programs(monkeypatch):
    """Every row block its own program (the GPU launches several per SM): the fp32 partial dW rows
    are reduced to the same gradient."""
    import llmstack.kernels.rmsnorm as rn
    monkeypatch.setattr(rn, "_num_row_programs", lambda n_blocks, device, num_warps: n_blocks)
    torch.manual_seed(4)
    x, w, gy = torch.randn(300, 64), 1 + 0.2 * torch.randn(64), torch.randn(300, 64)
    (y,), (dx, dw) = _grads(lambda a, b: rms_norm_triton(a, b, EPS), [x, w], [gy])
    (yr,), (dxr, dwr) = _grads(lambda a, b: rms_norm_reference(a, b, EPS), [x, w], [gy])
    for ours, ref, what in ((y, yr, "y"), (dx, dxr, "dx"), (dw, dwr, "dW")):
        assert_close(ours, ref, torch.float32, what)


def test_backward_keeps_several_programs_per_sm(monkeypatch):
    import types

    import llmstack.kernels.rmsnorm as rn
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert rn._num_row_programs(10**6, cuda, 4) == 132 * 4 and rn._num_row_programs(10**6, cuda, 16) == 132
    assert rn._num_row_programs(50, cuda, 4) == 50  # never more programs than row blocks


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rms_norm_residual_promotes_like_torch_add(impl):
    """Under autocast a bf16 branch output meets the fp32 residual stream: the sum and the norm are
    fp32, exactly as rms_norm(x + a) in torch."""
    fn = {"torch": rms_norm_residual_torch, "triton": rms_norm_residual_triton}[impl]
    torch.manual_seed(5)
    x, a, w = torch.randn(7, 96), torch.randn(7, 96).bfloat16(), 1 + 0.2 * torch.randn(96)
    gy, gs = torch.randn(7, 96), torch.randn(7, 96)
    (y, s), (dx, da, dw) = _grads(lambda p, q, r: fn(p, q, r, EPS), [x, a, w], [gy, gs])
    (yr, sr), (dxr, dar, dwr) = _grads(lambda p, q, r: rms_norm_residual_reference(p, q, r, EPS), [x, a, w], [gy, gs])
    assert y.dtype == s.dtype == torch.float32 and da.dtype == torch.bfloat16
    for ours, ref, what in ((y, yr, "y"), (s, sr, "sum"), (dx, dxr, "dx"), (dw, dwr, "dW")):
        assert_close(ours, ref, torch.float32, f"{impl} {what}")
    assert_close(da, dar, torch.bfloat16, f"{impl} d_branch")


def test_model_blocks_use_the_fused_residual_norm():
    """Each block's attention-output add and FFN norm are one rms_norm_residual call; the model's
    output is unchanged (the torch op is the same arithmetic as the unfused pair)."""
    import dataclasses

    from llmstack.config import ModelConfig
    from llmstack.kernels import torch_ops
    from llmstack.model import Llama
    calls = []
    ops = torch_ops()

    def counting(*args):
        calls.append(1)
        return ops.rms_norm_residual(*args)

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    model = Llama(cfg, dataclasses.replace(ops, rms_norm_residual=counting))
    tokens = torch.randint(0, 64, (2, 16))
    out = model(tokens)
    assert len(calls) == cfg.n_layers
    # unfused by hand: x + a, then the norm
    x = model.tok_embeddings(tokens)
    rope = (model.rope_cos, model.rope_sin)
    for blk in model.layers:
        x = x + blk.attention(blk.attention_norm(x, ops), rope, ops)
        x = x + blk.feed_forward(rms_norm_torch(x, blk.ffn_norm.weight, blk.ffn_norm.eps), ops)
    torch.testing.assert_close(out, model.output(model.norm(x, ops)).float(), rtol=0, atol=0)
