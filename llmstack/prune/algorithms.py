"""Which weights of one matrix W [out, in] to remove, and (SparseGPT) how to update the others.

Every function returns a keep-mask (bool, True = kept) of W's shape. `pattern=(n, m)` is N:M
semi-structured sparsity: exactly n weights kept in every m consecutive weights of a row (along
the input dimension; 2:4 is the layout of NVIDIA's sparse tensor cores). Without a pattern the
counts are exact too: floor(sparsity * size) weights go, where the unit is

- magnitude: the whole layer, lowest |W| (Han et al. 2015; the baseline in the Wanda paper);
- Wanda (Sun et al. 2023): each output row, lowest |W_ij| * ||X_j||_2 (X: the layer's inputs);
- SparseGPT (Frantar & Alistarh 2023): each block of `block_size` columns (cumulative counts,
  so the layer total is floor(sparsity * size) too), lowest w^2 / [H^-1]_jj^2 on the weights as
  updated so far; after each column is pruned its error is pushed onto the columns to its right
  through the inverse Hessian (the same OBS sweep as GPTQ, `llmstack/calibration.py`).
"""
from __future__ import annotations

import torch

from llmstack.calibration import inverse_hessian_factor, obs_sweep

Pattern = tuple[int, int]


def _quota(sparsity: float, size: int) -> int:
    return int(sparsity * size)


def _drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of `scores` (any shape) with its `count` lowest entries removed."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        keep[torch.topk(scores.flatten(), count, largest=False).indices] = False
    return keep.view(scores.shape)


def _drop_lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        keep.scatter_(1, torch.topk(scores, count, dim=1, largest=False).indices, False)
    return keep


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the n highest scores of every m consecutive columns, per row."""
    n, m = pattern
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, False)
    return keep.reshape(rows, cols)


def magnitude_mask(W: torch.Tensor, *, sparsity: float, pattern: Pattern | None = None) -> torch.Tensor:
    scores = W.detach().abs().float()
    return nm_mask(scores, pattern) if pattern else _drop_lowest(scores, _quota(sparsity, W.numel()))


def wanda_scores(W: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: a weight matters as much as the inputs it multiplies."""
    return W.detach().abs().float() * input_norms.float()[None, :]


def wanda_mask(W: torch.Tensor, input_norms: torch.Tensor, *, sparsity: float,
               pattern: Pattern | None = None) -> torch.Tensor:
    scores = wanda_scores(W, input_norms)
    return nm_mask(scores, pattern) if pattern else _drop_lowest_per_row(scores, _quota(sparsity, W.shape[1]))


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, *, sparsity: float, pattern: Pattern | None = None,
                    damp: float = 0.01, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and updated W in W's dtype, keep-mask). H = 2 X^T X / n of the layer's inputs."""
    out_dtype = W.dtype
    W = W.detach().float().clone()
    rows, cols = W.shape
    Hinv, dead = inverse_hessian_factor(H, damp)
    W[:, dead] = 0.0
    if pattern:  # an N:M group must not straddle two blocks
        block_size = max(pattern[1], block_size // pattern[1] * pattern[1])
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    diag = {}

    def block_start(i1: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> None:
        diag["d"] = torch.diag(Hinv1)
        if not pattern:
            i2 = i1 + W1.shape[1]
            count = _quota(sparsity, rows * i2) - _quota(sparsity, rows * i1)
            keep[:, i1:i2] = _drop_lowest(W1 ** 2 / diag["d"][None, :] ** 2, count)

    def column(col: int, W1: torch.Tensor, i: int, ahead) -> torch.Tensor:
        if pattern and col % pattern[1] == 0:
            m = pattern[1]
            keep[:, col:col + m] = nm_mask(W1[:, i:i + m] ** 2 / diag["d"][None, i:i + m] ** 2, pattern)
        return W1[:, i].masked_fill(~keep[:, col], 0.0)

    obs_sweep(W, Hinv, block_size=block_size, column=column, block_start=block_start)
    return W.to(out_dtype), keep
