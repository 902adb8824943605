"""GPTQ (Frantar et al., 2022): quantize a linear layer's columns one at a time and push each
column's rounding error onto the not-yet-quantized columns, weighted by the inverse Hessian of
the layer-wise reconstruction loss ||X W^T - X Q^T||^2, H = 2 X^T X / n.

`gptq_quantize(W, H, ...)` returns the same tensors as RTN (`quant/rtn.py`), so QuantLinear does
not care which made them. The Hessians, the block-by-block calibration pass, the inverse-Hessian
factor and the column sweep are shared with SparseGPT (`llmstack/calibration.py`).

Details that matter: dead inputs (zero diagonal) are pinned to zero; the diagonal is damped by
`damp` x its mean before the Cholesky factorization of H^-1; columns are processed in blocks of
128 with lazy batched updates of the rest. Group scales (int4): without act-order a group's scale
and zero point are fixed when the loop reaches the group's first column, from the already
error-corrected weights; with act-order (columns in order of decreasing H diagonal) they are
fixed up front from the original weights ("static groups"), so the stored format keeps
group = column // G. int8 uses one symmetric scale per output row, fixed up front.

`gptq_model` runs the calibration batches block by block: inputs to block i come from the
already quantized blocks 0..i-1, as in the paper.

Exact zeros in W (a pruned model) are kept at the code of 0 (the int4 group range always
includes 0), so a pruned-then-quantized layer is exactly as sparse as before.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from llmstack.calibration import Hessian, inverse_hessian_factor, obs_sweep, reconstruction_error, run_blockwise
from llmstack.kernels.dequant_matmul import pack_int4
from llmstack.quant.rtn import dequantize_with, n_groups, quant_params, quantize_with

__all__ = ["Hessian", "gptq_model", "gptq_quantize"]


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128) -> dict[str, torch.Tensor]:
    W = W.detach().float().clone()
    N, K = W.shape
    # exact zeros (a pruned layer) keep the code of 0, so pruning then quantizing stays sparse;
    # their drift from the updates is compensated like any rounding error
    keep_zero = W == 0 if bool((W == 0).any()) else None
    dead = torch.diag(H) == 0
    W[:, dead] = 0.0

    # scales fixed up front: int8 per row; int4 static groups when columns are permuted
    G = n_groups(K, group_size) if bits == 4 else 1
    scales = torch.zeros(N, G, device=W.device)
    zeros = torch.zeros(N, G, device=W.device)
    static = bits == 8 or act_order
    if static:
        for g in range(G):
            cols = slice(g * group_size, min((g + 1) * group_size, K)) if bits == 4 else slice(None)
            scales[:, g], zeros[:, g] = quant_params(W[:, cols], bits)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    W = W[:, perm]
    if keep_zero is not None:
        keep_zero = keep_zero[:, perm]
    Hinv, _ = inverse_hessian_factor(H, damp, perm if act_order else None)
    group_of = (perm // group_size) if bits == 4 else torch.zeros(K, dtype=torch.long, device=W.device)
    Q = torch.zeros_like(W)

    def column(col: int, W1: torch.Tensor, i: int, ahead) -> torch.Tensor:
        g = int(group_of[col])
        if not static and col % group_size == 0:
            # the group's columns as they are now: the block's updated ones, then those after the
            # block with this block's errors so far applied (a group may start mid-block)
            i2 = col - i + W1.shape[1]
            end = min(col + group_size, K)
            part = torch.cat([W1[:, i:min(end, i2) - (col - i)], ahead(end) if end > i2 else W1[:, :0]], dim=1)
            if keep_zero is not None:
                part = part.masked_fill(keep_zero[:, col:col + part.shape[1]], 0.0)
            scales[:, g], zeros[:, g] = quant_params(part, bits)
        w = W1[:, i] if keep_zero is None else W1[:, i].masked_fill(keep_zero[:, col], 0.0)
        s, z = scales[:, g], zeros[:, g]
        q = quantize_with(w[:, None], s, z, bits)
        Q[:, col] = q[:, 0]
        return dequantize_with(q, s, z)[:, 0]

    obs_sweep(W, Hinv, block_size=block_size, column=column)
    codes = Q[:, torch.argsort(perm)]
    if bits == 8:
        return {"qweight": codes.to(torch.int8).contiguous(), "scales": scales[:, 0].contiguous()}
    return {"qweight": pack_int4(codes.to(torch.uint8)), "scales": scales.contiguous(),
            "zeros": zeros.to(torch.uint8).contiguous()}


@torch.no_grad()
def gptq_model(model, batches, *, bits: int, group_size: int, damp: float, act_order: bool, make_layer) -> dict:
    """Quantize every nn.Linear inside model.layers with GPTQ, block by block on calibration
    `batches` (list of llmstack Batch). `make_layer(tensors, linear)` builds the replacement
    module. Returns {qualified name: relative reconstruction error on the calibration inputs}."""
    errors = {}

    def process(li: int, block: nn.Module, linears: dict, hess: dict) -> None:
        for name, lin in linears.items():
            H = hess[name].H
            tensors = gptq_quantize(lin.weight, H, bits=bits, group_size=group_size, damp=damp, act_order=act_order)
            new = make_layer(tensors, lin)
            errors[f"layers.{li}.{name}"] = reconstruction_error(lin.weight, new.dequantized_weight(), H)
            parent = block.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], new)

    device = model.tok_embeddings.weight.device
    run_blockwise(model, batches, make_stat=lambda lin: Hessian(lin.in_features, device), process_block=process,
                  what="GPTQ")
    return errors
