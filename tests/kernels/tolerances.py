"""Kernel test tolerances, per dtype, in one place.

Rule (from flash-attention's tests): our kernel's error against an fp32 reference must be within
ERROR_FACTOR x the error of eager torch computed in the same low precision, plus the dtype's atol.
For fp32 the absolute tolerances below are used directly.
"""
import torch

ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ERROR_FACTOR = 2.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL[dtype], rtol=RTOL[dtype],
                               msg=lambda m: f"{what}: {m}")


def assert_within_eager_error(ours: torch.Tensor, eager_lowp: torch.Tensor, ref_fp32: torch.Tensor,
                              dtype: torch.dtype, what: str = "") -> None:
    ours_err = (ours.float() - ref_fp32.float()).abs().max().item()
    eager_err = (eager_lowp.float() - ref_fp32.float()).abs().max().item()
    bound = ERROR_FACTOR * eager_err + ATOL[dtype]
    assert ours_err <= bound, f"{what}: max error {ours_err:.3e} > {ERROR_FACTOR} x eager {eager_err:.3e} + atol {ATOL[dtype]:.1e}"


def interpreter_bf16_slack(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The Triton interpreter casts fp32 -> bf16 by truncation (triton/runtime/interpreter.py,
    cast_impl), where a GPU rounds to nearest even: the GPU would store either the same value or
    the next bf16 value away from zero. Take, per element, whichever of the two is nearer the
    reference (nothing more) before the usual eager-error rule. Used for bf16 under the interpreter only."""
    ours = ours.float()
    _, exp = torch.frexp(ours)
    ulp = torch.ldexp(torch.ones_like(ours), exp - 8)  # bf16: 8 significant bits
    away = ours + ours.sign() * ulp
    return torch.where((away - ref.float()).abs() < (ours - ref.float()).abs(), away, ours)


def compare(ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """fp32: close to the fp32 reference; fp16/bf16: within ERROR_FACTOR x eager torch's own error."""
    if dtype == torch.float32:
        assert_close(ours, ref, dtype, what)
        return
    import os
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        ours = interpreter_bf16_slack(ours, ref)
    assert_within_eager_error(ours, eager, ref, dtype, what)
