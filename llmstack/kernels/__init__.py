"""The one place that decides which implementation each hot op uses.

Every op has a plain-torch implementation (`<op>_torch`) and a Triton one (`<op>_triton`) in
its own file. `resolve_ops(backend, device)` picks per op:

- `torch`: the torch implementation everywhere;
- `triton`: the Triton kernels; on a CPU device this needs `TRITON_INTERPRET=1`, and a missing
  kernel is an error, never a silent torch fallback;
- `auto`: Triton on CUDA, torch on CPU (the interpreter is for tests: ask for `triton`).

The choice is returned in `KernelOps.backends` so the trainer prints it and stores it in
summary.json.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmstack.errors import UserError

# op name -> module in this package
OP_MODULES = {
    "rms_norm": "rmsnorm",
    "rms_norm_residual": "rmsnorm",
    "rope": "rope",
    "attention": "attention",
    "swiglu": "swiglu",
    "gate_up_swiglu": "matmul",
    "linear_cross_entropy": "cross_entropy",
    "kd_loss": "kd_loss",
}


class KernelUnavailable(UserError):
    """A kernel backend that cannot run here; one line naming kernels.backend and what is allowed."""


def triton_interpreting() -> bool:
    """Whether Triton runs under its interpreter (TRITON_INTERPRET=1), read now: the one reader
    of the flag, so the backend choice and every kernel launch see the same value. (Triton itself
    decides interpreter-or-compiled when a kernel is defined, so the flag belongs before import;
    only the autotune config lists are chosen at definition for that reason.)"""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class KernelOps:
    rms_norm: Callable
    rms_norm_residual: Callable
    rope: Callable
    attention: Callable
    swiglu: Callable
    gate_up_swiglu: Callable
    linear_cross_entropy: Callable
    kd_loss: Callable
    backends: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{op}={b}" for op, b in self.backends.items())


def _load(op: str, impl: str) -> Callable:
    module = importlib.import_module(f"{__name__}.{OP_MODULES[op]}")
    fn = getattr(module, f"{op}_{impl}", None)
    if fn is None:
        raise KernelUnavailable(f"kernels.backend: no {impl} implementation of {op} in llmstack/kernels/{OP_MODULES[op]}.py")
    return fn


def resolve_device(text: str) -> torch.device:
    """A --device value as a torch.device that exists on this machine, or one line naming it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device: got {text!r}, allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(f"--device {text}: no CUDA device on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {text}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise UserError(f"--device: got {text!r}, allowed: cpu, cuda, cuda:N")
    return device


def choose_backend(backend: str, device_type: str) -> str:
    """The one backend resolver (ops table, distillation loss, quantized linears): `auto` is Triton
    on CUDA and torch elsewhere; `triton` off CUDA needs the interpreter."""
    if backend == "auto":
        return "triton" if device_type == "cuda" else "torch"
    if backend == "triton" and device_type != "cuda" and not triton_interpreting():
        raise KernelUnavailable("kernels.backend=triton on a CPU device needs TRITON_INTERPRET=1 (the Triton interpreter); "
                                "allowed here: auto, torch")
    return backend


def resolve_ops(backend: str = "auto", device_type: str = "cpu") -> KernelOps:
    chosen = choose_backend(backend, device_type)
    fns = {op: _load(op, chosen) for op in OP_MODULES}
    return KernelOps(**fns, backends={op: chosen for op in OP_MODULES})


def torch_ops() -> KernelOps:
    return resolve_ops("torch", "cpu")
