"""2:4-pruned linears on NVIDIA's sparse tensor cores, for inference.

`to_semi_structured(model)` swaps every nn.Linear of the transformer blocks whose weight is 2:4
(at most 2 nonzeros in every 4 consecutive inputs of a row: what `llmstack prune --pattern 2:4`
writes) for a `SemiStructuredLinear` holding `torch.sparse.to_sparse_semi_structured(weight)`:
the compressed weight (half the values plus 2-bit indices) and the sparse GEMM (cuSPARSELt, or
CUTLASS). It needs CUDA, compute capability 8.0+ and fp16/bf16 weights; anything else is one
line naming what is missing. Layers the sparse kernels cannot take (not 2:4, or a shape below
their minimum tile) stay dense and are listed in the returned report. On CPU a pruned model
simply runs dense: torch has no semi-structured CPU kernels.

The swap is for inference only (the weights become frozen compressed tensors; do not train or
save the swapped model). A swapped w1/w3 pair makes FeedForward take its unfused path, since
the fused gate-up kernel reads dense weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.sparse import to_sparse_semi_structured

from llmstack.prune.pruner import PruneError


def is_2to4(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight.detach().reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


class SemiStructuredLinear(nn.Module):
    """y = x W^T + b with W a 2:4 semi-structured sparse tensor."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.contiguous(), self.weight, self.bias)


def check_device(model) -> None:
    w = model.tok_embeddings.weight
    if w.device.type != "cuda":
        raise PruneError(f"2:4 sparse kernels need a CUDA device, the model is on {w.device.type}; "
                         "on CPU a pruned model runs dense")
    cap = torch.cuda.get_device_capability(w.device)
    if cap < (8, 0):
        raise PruneError(f"2:4 sparse kernels need compute capability 8.0+ (Ampere or newer), this GPU has "
                         f"{cap[0]}.{cap[1]}; run the model dense")
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise PruneError(f"2:4 sparse kernels take float16/bfloat16 weights, the model is {w.dtype}; cast it first")


@torch.no_grad()
def to_semi_structured(model) -> dict:
    """Swap the 2:4 block linears in place; returns {"swapped": [names], "dense": {name: why}}."""
    check_device(model)
    swapped, dense = [], {}
    for name, lin in [(n, m) for n, m in model.named_modules() if n.startswith("layers.") and type(m) is nn.Linear]:
        if not is_2to4(lin.weight):
            dense[name] = "not 2:4"
            continue
        try:
            new = SemiStructuredLinear(lin)
        except RuntimeError as e:  # shape below the kernels' minimum tile, or no kernel for this build
            dense[name] = str(e).strip().splitlines()[0][:160]
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, new)
        swapped.append(name)
    return {"swapped": swapped, "dense": dense}
