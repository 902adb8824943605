"""The vocabulary-parallel cross-entropy (the shared chunk driver with MAX/SUM all-reduces per
chunk) on 2 gloo ranks against the naive single-process loss: loss, grad_h (summed over ranks)
and each rank's rows of grad_W, in fp32 and bf16; a target outside the vocabulary is one clear
error on every rank, raised before any collective."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmstack.kernels.chunked_loss import TargetOutOfRange
from llmstack.kernels.cross_entropy import linear_cross_entropy_reference
from llmstack.parallel.tensor_parallel import vocab_parallel_cross_entropy
from tests.kernels.tolerances import assert_within_eager_error
from tests.parallel.launch import run_gloo

pytestmark = pytest.mark.slow
TP, N, D, V = 2, 29, 16, 202


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100
    return h, w, t


def _worker(rank: int) -> dict:
    out = {}
    lo, hi = rank * V // TP, (rank + 1) * V // TP
    for dtype in (torch.float32, torch.bfloat16):
        h, w, t = _inputs(dtype)
        h.requires_grad_(True)
        w_local = w[lo:hi].clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(h, w_local, t, vocab_start=lo, vocab_total=V, group=dist.group.WORLD,
                                            chunk_size=6, ignore_index=-100, sum_dh=True)
        (loss * 0.5).backward()
        out[str(dtype)] = (loss.item(), h.grad.float().numpy().copy(), w_local.grad.float().numpy().copy(),
                           str(h.grad.dtype), str(w_local.grad.dtype))
    h, w, t = _inputs(torch.float32)
    t[7] = V + 5
    try:
        vocab_parallel_cross_entropy(h, w[lo:hi], t, vocab_start=lo, vocab_total=V, group=dist.group.WORLD,
                                     chunk_size=6, ignore_index=-100, sum_dh=True)
        out["error"] = None
    except TargetOutOfRange as e:
        out["error"] = str(e)
    return out


def _grads(h, w, t, *, upcast: bool):
    """Loss, grad_h, grad_W of the naive loss (0.5 x, as the workers), fp32 or in the inputs' dtype."""
    h = (h.float() if upcast else h).requires_grad_(True)
    w = (w.float() if upcast else w).requires_grad_(True)
    loss = linear_cross_entropy_reference(h, w, t)
    (loss * 0.5).backward()
    return loss.detach().float(), h.grad.float(), w.grad.float()


def test_vocab_parallel_ce_matches_single_process():
    results = run_gloo(_worker, TP)
    for dtype in (torch.float32, torch.bfloat16):
        ref = _grads(*_inputs(dtype), upcast=True)
        eager = _grads(*_inputs(dtype), upcast=False)
        for rank in range(TP):
            loss, gh, gw, gh_dtype, gw_dtype = results[rank][str(dtype)]
            assert gh_dtype == gw_dtype == str(dtype)
            lo, hi = rank * V // TP, (rank + 1) * V // TP
            ours = (torch.tensor(loss), torch.from_numpy(gh), torch.from_numpy(gw))
            for what, o, e, r in zip(("loss", "dh", "dW"), ours, eager, ref):
                e, r = (e[lo:hi], r[lo:hi]) if what == "dW" else (e, r)
                if dtype == torch.float32:
                    torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank} {what}: {m}")
                else:  # loss summed over ~20 rows: compared relative to its size
                    sc = float(r.abs().max()) if what == "loss" else 1.0
                    assert_within_eager_error(o / sc, e / sc, r / sc, dtype, f"bf16 rank {rank} {what}")
    for rank in range(TP):
        assert results[rank]["error"] and f"target id {V + 5} is outside the vocabulary [0, {V})" in results[rank]["error"]
