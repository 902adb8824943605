"""RoPE Triton kernel (q and k in one launch; backward = inverse rotation) against the fp32
reference, through the Triton interpreter on CPU: GQA head counts, packed position_ids, Llama-3
scaled tables, head dims whose half is not a power of two."""

import pytest
import torch

from llmstack.config import ModelConfig, RopeScaling
from llmstack.kernels.rope import rope_reference, rope_torch, rope_triton
from llmstack.model import rope_tables
from tests.kernels.grads import forward_backward
from tests.kernels.tolerances import assert_close
from tests.kernels.tolerances import compare as _compare

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


B, T = 2, 17


def _tables(head_dim, n_heads=4, scaled=False, max_seq_len=64):
    cfg = ModelConfig(dim=head_dim * n_heads, n_heads=n_heads, max_seq_len=max_seq_len, rope_theta=500000.0,
                      rope_scaling=RopeScaling() if scaled else None)
    return rope_tables(cfg)


def _packed_positions():
    """Two rows of packed documents: positions restart at each document boundary."""
    row0 = torch.cat([torch.arange(5), torch.arange(7), torch.arange(5)])
    row1 = torch.cat([torch.arange(12), torch.arange(5)]) + 0
    row1[12:] += 30  # a document continuing deep into the table
    return torch.stack([row0, row1])


def _eager_lowp(q, k, cos, sin, position_ids=None):
    """Eager torch with every op in q's low-precision dtype."""
    c = (cos[:q.shape[1]][None] if position_ids is None else cos[position_ids])[:, :, None, :].to(q.dtype)
    s = (sin[:q.shape[1]][None] if position_ids is None else sin[position_ids])[:, :, None, :].to(q.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return rot(q), rot(k)


def _run(fn, q, k, cos, sin, pos, gq, gk):
    return forward_backward(fn, [q, k], [gq, gk], rest=[cos, sin, pos])


def _check(dtype, H, Hkv, D, position_ids, scaled):
    torch.manual_seed(0)
    cos, sin = _tables(D, scaled=scaled)
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, dtype=dtype)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    ours = _run(rope_triton, q, k, cos, sin, position_ids, gq, gk)
    ref = _run(rope_reference, q.float(), k.float(), cos, sin, position_ids, gq, gk)
    eager = _run(_eager_lowp, q, k, cos, sin, position_ids, gq, gk)
    assert ours[0].dtype == ours[1].dtype == ours[2].dtype == ours[3].dtype == dtype
    assert ours[0].shape == q.shape and ours[1].shape == k.shape
    for o, e, r, what in zip(ours, eager, ref, ("q_out", "k_out", "dq", "dk")):
        _compare(o, e, r, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,Hkv", [(4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("packed", [False, True], ids=["pos_none", "pos_packed"])
def test_rope_forward_backward(dtype, H, Hkv, packed):
    _check(dtype, H, Hkv, 64, _packed_positions() if packed else None, scaled=packed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain_table", "llama3_scaled_table"])
def test_rope_odd_head_dim(dtype, scaled):
    """D = 12: half = 6 is not a power of two, so the head-dim block is masked."""
    _check(dtype, 4, 2, 12, _packed_positions(), scaled=scaled)


def test_rope_many_tokens_several_programs():
    """B*T = 600 tokens: more than one token block per launch, with a masked tail block."""
    torch.manual_seed(4)
    cos, sin = _tables(64, scaled=True, max_seq_len=256)
    pos = torch.stack([torch.cat([torch.arange(150), torch.arange(50)]), torch.arange(200),
                       torch.cat([torch.arange(7), torch.arange(193)])])
    q, k = torch.randn(3, 200, 4, 64), torch.randn(3, 200, 2, 64)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    ours = _run(rope_triton, q, k, cos, sin, pos, gq, gk)
    ref = _run(rope_reference, q, k, cos, sin, pos, gq, gk)
    for o, r, what in zip(ours, ref, ("q_out", "k_out", "dq", "dk")):
        assert_close(o, r, torch.float32, what)


def test_rope_scaled_table_differs():
    """The Llama-3 scaled table really changes the low frequencies (so the scaled tests test something)."""
    plain, scaled = _tables(64)[0], _tables(64, scaled=True)[0]
    assert not torch.allclose(plain, scaled)


def test_rope_none_equals_arange_positions():
    torch.manual_seed(1)
    cos, sin = _tables(64)
    q, k = torch.randn(B, T, 4, 64), torch.randn(B, T, 2, 64)
    a = rope_triton(q, k, cos, sin, None)
    b = rope_triton(q, k, cos, sin, torch.arange(T).expand(B, T))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_rope_backward_is_inverse_rotation():
    torch.manual_seed(2)
    cos, sin = _tables(64)
    q = torch.randn(B, T, 4, 64, requires_grad=True)
    k = torch.randn(B, T, 1, 64, requires_grad=True)
    qo, ko = rope_triton(q, k, cos, sin)
    # the gradient of sum(out * out_detached) is R^T R x = x for a rotation R
    ((qo * qo.detach()).sum() + (ko * ko.detach()).sum()).backward()
    assert_close(q.grad, q.detach(), torch.float32, "R^T R q")
    assert_close(k.grad, k.detach(), torch.float32, "R^T R k")


def test_rope_noncontiguous_inputs_and_only_q_grad():
    """q/k as strided views of a fused qkv projection; only q's output feeds the loss."""
    torch.manual_seed(3)
    cos, sin = _tables(64)
    qkv = torch.randn(B, T, 4 * 64 + 2 * 64, requires_grad=True)
    q, k = qkv[..., :256].view(B, T, 4, 64), qkv[..., 256:].view(B, T, 2, 64)
    gq = torch.randn(B, T, 4, 64)
    (rope_triton(q, k, cos, sin)[0] * gq).sum().backward()
    ours = qkv.grad.clone()
    qkv.grad = None
    q, k = qkv[..., :256].view(B, T, 4, 64), qkv[..., 256:].view(B, T, 2, 64)
    (rope_reference(q, k, cos, sin)[0] * gq).sum().backward()
    assert_close(ours, qkv.grad, torch.float32, "dqkv")


@pytest.mark.parametrize("packed", [False, True])
def test_rope_torch_path_matches_reference_fwd_bwd(packed):
    cos, sin = _tables(64)
    pos = _packed_positions() if packed else None
    q, k = torch.randn(B, T, 4, 64), torch.randn(B, T, 2, 64)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    outs = []
    for fn in (rope_torch, rope_reference):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        a, b = fn(qq, kk, cos, sin, pos)
        ((a * gq).sum() + (b * gk).sum()).backward()
        outs.append((a.detach(), b.detach(), qq.grad, kk.grad))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y)


def test_rope_rejects_bad_input():
    cos, sin = _tables(64, max_seq_len=16)
    q, k = torch.randn(B, T, 4, 64), torch.randn(B, T, 2, 64)
    with pytest.raises(ValueError, match="exceeds"):
        rope_triton(q, k, cos, sin)  # T=17 > 16 table rows
    with pytest.raises(ValueError, match="cos/sin"):
        rope_triton(q[:, :8], k[:, :8], cos[:, :16], sin[:, :16])
    with pytest.raises(ValueError, match="disagree"):
        rope_triton(q[:, :8], k[:, :4], cos, sin)
    with pytest.raises(ValueError, match="position_ids"):
        rope_triton(q[:, :8], k[:, :8], cos, sin, torch.zeros(B, 7, dtype=torch.long))
    with pytest.raises(RuntimeError, match="outside"):
        rope_triton(q[:, :8], k[:, :8], cos, sin, torch.full((B, 8), 16, dtype=torch.long))
