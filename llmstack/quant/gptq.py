"""GPTQ (Frantar et al., 2022): quantize a linear layer's columns one at a time and push each
column's rounding error onto the not-yet-quantized columns, weighted by the inverse Hessian of
the layer-wise reconstruction loss ||X W^T - X Q^T||^2, H = 2 X^T X / n.

`Hessian` accumulates X^T X from a layer's inputs (a forward hook). `gptq_quantize(W, H, ...)`
returns the same tensors as RTN (`quant/rtn.py`), so QuantLinear does not care which made them.

Details that matter: dead inputs (zero diagonal) are pinned to zero; the diagonal is damped by
`damp` x its mean before the Cholesky factorization of H^-1; columns are processed in blocks of
128 with lazy batched updates of the rest. Group scales (int4): without act-order a group's scale
and zero point are fixed when the loop reaches the group's first column, from the already
error-corrected weights; with act-order (columns in order of decreasing H diagonal) they are
fixed up front from the original weights ("static groups"), so the stored format keeps
group = column // G. int8 uses one symmetric scale per output row, fixed up front.

`gptq_model` runs the calibration batches block by block: inputs to block i come from the
already quantized blocks 0..i-1, as in the paper.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from llmstack.kernels.dequant_matmul import pack_int4
from llmstack.quant.rtn import dequantize_with, n_groups, quant_params, quantize_with


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

    def hook(self, module, inputs, output) -> None:
        self.add(inputs[0].detach())


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128) -> dict[str, torch.Tensor]:
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
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
    W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // group_size) if bits == 4 else torch.zeros(K, dtype=torch.long, device=W.device)

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    Q = torch.zeros_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not static and col % group_size == 0:
                # the group's remaining columns: current block's updated ones, then the rest of W
                end = min(col + group_size, K)
                block_part = W1[:, i:min(end, i2) - i1]
                rest = W[:, i2:end] if end > i2 else W1[:, :0]
                scales[:, g], zeros[:, g] = quant_params(torch.cat([block_part, rest], dim=1), bits)
            w = W1[:, i]
            s, z = scales[:, g], zeros[:, g]
            q = quantize_with(w[:, None], s, z, bits)
            Q1[:, i] = q[:, 0]
            err = (w - dequantize_with(q, s, z)[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

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
    device = model.tok_embeddings.weight.device
    rope = (model.rope_cos, model.rope_sin)
    xs = [model.tok_embeddings(b.input.to(device)) for b in batches]
    extras = [(None if b.position_ids is None else b.position_ids.to(device),
               None if b.doc_ids is None else b.doc_ids.to(device)) for b in batches]
    errors = {}
    for li, block in enumerate(model.layers):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        hess = {n: Hessian(m.in_features, device) for n, m in linears.items()}
        handles = []
        for n, m in linears.items():
            parent = block.get_submodule(n.rsplit(".", 1)[0])
            if n.endswith((".w1", ".w3")):
                # the fused gate-up op reads w1/w3's weights without calling their forward:
                # their input is the feed-forward block's input
                handles.append(parent.register_forward_pre_hook(
                    lambda mod, args, h=hess[n]: h.add(args[0].detach())))
            else:
                handles.append(m.register_forward_hook(hess[n].hook))
        try:
            for x, (pos, doc) in zip(xs, extras):
                block(x, rope, model.ops, pos, doc)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n, h in hess.items() if h.n == 0]
        if missing:
            raise RuntimeError(f"GPTQ: no calibration inputs reached layers.{li}.{missing[0]} (hook never ran)")
        for name, lin in linears.items():
            H = hess[name].H
            tensors = gptq_quantize(lin.weight, H, bits=bits, group_size=group_size, damp=damp, act_order=act_order)
            new = make_layer(tensors, lin)
            dW = new.dequantized_weight() - lin.weight.float()
            # ||X dW^T||^2 / ||X W^T||^2 via the Hessian: tr(dW H dW^T) / tr(W H W^T)
            num = torch.einsum("nk,kl,nl->", dW, H, dW)
            den = torch.einsum("nk,kl,nl->", lin.weight.float(), H, lin.weight.float()).clamp(min=1e-12)
            errors[f"layers.{li}.{name}"] = float(num / den)
            parent = block.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], new)
        xs = [block(x, rope, model.ops, pos, doc) for x, (pos, doc) in zip(xs, extras)]
    return errors
