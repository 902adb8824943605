"""Calibration machinery shared by the one-shot compressors (GPTQ in `quant/gptq.py`, Wanda and
SparseGPT in `prune/`): calibration batches, per-layer input statistics, the block-sequential
pass, and the OBS column sweep with its inverse-Hessian factor.

- `calibration_batches(cfg, n)`: n batches of the checkpoint's own training split.
- `Hessian` (2/n X^T X, for GPTQ and SparseGPT) and `InputNorms` (sum over tokens of x_j^2 per
  input channel, for Wanda) accumulate from a linear layer's inputs.
- `run_blockwise(model, batches, make_stat, process_block)`: the calibration batches go through
  `model.layers` one block at a time; block i's statistics come from the outputs of blocks
  0..i-1 *after* they were processed (quantized, pruned), as in the GPTQ/SparseGPT/Wanda papers.
- `inverse_hessian_factor(H, damp)` and `obs_sweep(W, Hinv, ...)`: the column-by-column loop in
  which a column is replaced (rounded or pruned) and its error, scaled by 1/[H^-1]_ii, is pushed
  onto the columns not yet processed (Frantar & Alistarh: OBS with a fixed column order), with
  the lazy per-block batched update of the rest of the matrix.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from llmstack.data import build_data


def calibration_batches(cfg, n: int, seed: int = 0) -> list:
    """n training batches of the checkpoint's own corpus (its train split, not validation)."""
    data = build_data(cfg)
    data.train.seed = seed
    data.train.load_state_dict({"epoch": 0, "cursor": 0})
    return [data.train.next_batch() for _ in range(n)]


class Hessian:
    """Running 2/n * sum x x^T over the rows of a linear layer's inputs (fp32)."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


class InputNorms:
    """Per input channel j, the sum over calibration tokens of x_j^2 (fp32); `norms` is ||X_j||_2."""

    def __init__(self, in_features: int, device):
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.n += x.shape[0]
        self.sq.add_((x * x).sum(dim=0))

    @property
    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()


def _hook_inputs(block: nn.Module, stats: dict) -> list:
    """Forward hooks feeding each linear's input to its statistic; returns the handles."""
    handles = []
    for name, stat in stats.items():
        parent = block.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith((".w1", ".w3")):
            # the fused gate-up op reads w1/w3's weights without calling their forward:
            # their input is the feed-forward block's input
            handles.append(parent.register_forward_pre_hook(lambda mod, args, s=stat: s.add(args[0].detach())))
        else:
            handles.append(block.get_submodule(name).register_forward_hook(
                lambda mod, args, out, s=stat: s.add(args[0].detach())))
    return handles


@torch.no_grad()
def run_blockwise(model, batches, *, make_stat: Callable, process_block: Callable, what: str) -> list[torch.Tensor]:
    """Calibrate `model.layers` block by block on `batches` (llmstack Batch list).

    For block i: every nn.Linear inside it gets `make_stat(linear)` (an object with `.add(x)`)
    filled from its inputs; then `process_block(i, block, linears, stats)` changes the block in
    place; then the changed block runs again to make block i+1's inputs. Returns the outputs of
    the last block (the inputs of the final norm), one tensor per batch."""
    device = model.tok_embeddings.weight.device
    rope = (model.rope_cos, model.rope_sin)
    xs = [model.tok_embeddings(b.input.to(device)) for b in batches]
    extras = [(None if b.position_ids is None else b.position_ids.to(device),
               None if b.doc_ids is None else b.doc_ids.to(device)) for b in batches]
    for li, block in enumerate(model.layers):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        stats = {n: make_stat(m) for n, m in linears.items()}
        handles = _hook_inputs(block, stats)
        try:
            for x, (pos, doc) in zip(xs, extras):
                block(x, rope=rope, ops=model.ops, position_ids=pos, doc_ids=doc)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n, s in stats.items() if s.n == 0]
        if missing:
            raise RuntimeError(f"{what}: no calibration inputs reached layers.{li}.{missing[0]} (hook never ran)")
        process_block(li, block, linears, stats)
        xs = [block(x, rope=rope, ops=model.ops, position_ids=pos, doc_ids=doc) for x, (pos, doc) in zip(xs, extras)]
    return xs


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """||X (W_new - W)^T||^2 / ||X W^T||^2 on the calibration inputs, through H = 2 X^T X / n:
    tr(dW H dW^T) / tr(W H W^T)."""
    W, dW = W.detach().float(), W_new.detach().float() - W.detach().float()
    num = torch.einsum("nk,kl,nl->", dW, H, dW)
    den = torch.einsum("nk,kl,nl->", W, H, W).clamp(min=1e-12)
    return float(num / den)


def inverse_hessian_factor(H: torch.Tensor, damp: float,
                           perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, dead inputs).

    Dead inputs (zero diagonal: a channel that was always 0) get a unit diagonal so the matrix
    stays invertible; the caller zeroes their weights. `perm` reorders the columns first."""
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    if perm is not None:
        H = H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, *, block_size: int, column: Callable,
              block_start: Callable | None = None) -> None:
    """Replace the columns of W (fp32, in place) left to right, compensating each change on the
    columns to its right.

    `block_start(i1, W1, Hinv1)` runs when a block of `block_size` columns starts (W1: the block's
    current weights, all earlier errors applied). `column(col, W1, i, ahead)` returns the new value
    of column `col` (= W1[:, i]); `ahead(end)` gives the columns after the block up to `end` with
    this block's errors so far applied. Within a block the update is immediate; the rest of W gets
    the block's errors in one matmul at the block's end (same result, far fewer passes over W)."""
    K = W.shape[1]
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Out1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if block_start is not None:
            block_start(i1, W1, Hinv1)
        for i in range(i2 - i1):
            w = W1[:, i]

            def ahead(end: int, i=i, i1=i1, i2=i2, Err1=Err1) -> torch.Tensor:
                return W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]

            new = column(i1 + i, W1, i, ahead)
            Out1[:, i] = new
            err = (w - new) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Out1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
