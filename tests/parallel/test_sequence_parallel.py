"""Sequence parallelism on 2 gloo ranks, without DeepSpeed: the residual stream really is split along
the sequence, and loss and every gradient (merged over ranks) equal the single-process model's."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmstack.config import ModelConfig
from llmstack.model import Llama
from llmstack.parallel.tensor_parallel import apply_tensor_parallel, merge_shards
from tests.parallel.launch import run_gloo

pytestmark = pytest.mark.slow
TP = 2


def _model(tie: bool) -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, tie_embeddings=tie)
    return Llama(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (3, 16), generator=g)
    targets = torch.randint(0, 96, (3, 16), generator=g)
    targets[0, :5] = -100
    return tokens, targets


def _worker(rank: int, tie: bool):
    model = apply_tensor_parallel(_model(tie), dist.group.WORLD, rank, TP, sequence_parallel=True)
    residual_shapes = []
    model.layers[0].register_forward_hook(lambda m, args, out: residual_shapes.append(tuple(out.shape)))
    tokens, targets = _batch()
    loss = model(tokens, targets)
    loss.backward()
    logits = model(tokens)
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return rank, loss.item(), residual_shapes[0], grads, logits.detach().numpy()


@pytest.mark.parametrize("tie", [False, True])
def test_sequence_parallel_matches_single_process(tie):
    results = [(rank, loss, shape, {n: torch.from_numpy(g) for n, g in grads.items()}, torch.from_numpy(logits))
               for rank, loss, shape, grads, logits in run_gloo(_worker, TP, tie)]

    ref = _model(tie)
    tokens, targets = _batch()
    ref_loss = ref(tokens, targets)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    for rank, loss, shape, _, logits in results:
        assert shape == (3, 16 // TP, 32), f"rank {rank}: residual stream {shape}, expected the sequence split"
        assert abs(loss - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
        torch.testing.assert_close(logits, ref(tokens).detach(), rtol=1e-5, atol=1e-5)
    merged = merge_shards([r[3] for r in results])
    assert sorted(merged) == sorted(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(merged[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # norm weights are replicated: every rank must hold the same full gradient
    for name in ref_grads:
        if name.endswith("norm.weight"):
            torch.testing.assert_close(results[0][3][name], results[1][3][name], rtol=0, atol=0)
