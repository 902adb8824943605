"""The one forward + backward driver of the kernel tests: every implementation (Triton, torch path,
reference, eager low precision) is run through it, so they all see the same inputs and the same
upstream gradient."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def forward_backward(fn: Callable, inputs: Sequence[torch.Tensor], grad_outputs: Sequence | None = None, *,
                     rest: Sequence = (), **kwargs) -> tuple:
    """Call fn(*inputs, *rest, **kwargs) on fresh leaf copies of `inputs` and backpropagate
    sum_i <output_i, grad_outputs[i]> (in fp32; a None entry leaves that output out; no
    grad_outputs: each output's own sum, e.g. a scalar loss). `rest` are passed as they are and get
    no gradient (targets, rope tables, a teacher). Returns (*detached outputs, *input grads)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, *rest, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    if grad_outputs is None:
        grad_outputs = [torch.ones((), dtype=torch.float32)] * len(outs)
    terms = [(o.float() * g.float()).sum() for o, g in zip(outs, grad_outputs, strict=True) if g is not None]
    torch.stack(terms).sum().backward()
    return (*(o.detach() for o in outs), *(t.grad for t in leaves))
