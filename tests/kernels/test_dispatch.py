"""resolve_ops, for every op in the table: `torch` and `auto` on CPU give the torch path, `triton`
(under the interpreter) the Triton kernel, each named explicitly here so a swapped or renamed
implementation is caught; no op is missing and none falls back silently."""
import os

import pytest
import torch

from llmstack.kernels import OP_MODULES, KernelUnavailable, resolve_ops
from llmstack.kernels.attention import attention_torch, attention_triton
from llmstack.kernels.cross_entropy import linear_cross_entropy_torch, linear_cross_entropy_triton
from llmstack.kernels.kd_loss import kd_loss_torch, kd_loss_triton
from llmstack.kernels.matmul import gate_up_swiglu_torch, gate_up_swiglu_triton
from llmstack.kernels.rmsnorm import rms_norm_residual_torch, rms_norm_residual_triton, rms_norm_torch, rms_norm_triton
from llmstack.kernels.rope import rope_torch, rope_triton
from llmstack.kernels.swiglu import swiglu_torch, swiglu_triton

EXPECTED = {
    "attention": {"torch": attention_torch, "triton": attention_triton},
    "linear_cross_entropy": {"torch": linear_cross_entropy_torch, "triton": linear_cross_entropy_triton},
    "kd_loss": {"torch": kd_loss_torch, "triton": kd_loss_triton},
    "gate_up_swiglu": {"torch": gate_up_swiglu_torch, "triton": gate_up_swiglu_triton},
    "rms_norm": {"torch": rms_norm_torch, "triton": rms_norm_triton},
    "rms_norm_residual": {"torch": rms_norm_residual_torch, "triton": rms_norm_residual_triton},
    "rope": {"torch": rope_torch, "triton": rope_triton},
    "swiglu": {"torch": swiglu_torch, "triton": swiglu_triton},
}


def test_every_op_in_the_table_is_checked_here():
    assert set(EXPECTED) == set(OP_MODULES)


@pytest.mark.parametrize("backend, picks", [("torch", "torch"), ("auto", "torch"), ("triton", "triton")])
@pytest.mark.parametrize("op", sorted(EXPECTED))
def test_resolve_ops_picks_each_op(op, backend, picks):
    ops = resolve_ops(backend, "cpu")
    assert getattr(ops, op) is EXPECTED[op][picks]
    assert ops.backends[op] == picks


def _attention_on_cpu():
    q = torch.randn(1, 16, 2, 16)
    return attention_triton(q, q, q)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels were defined for the interpreter")
@pytest.mark.parametrize("flag", ["0", "1"])
def test_flag_set_after_import_reaches_resolve_ops_and_kernels_alike(flag, monkeypatch):
    # the kernel modules are imported above, so this changes the flag after import: the backend
    # choice and the kernel launch must read the same value (one refuses -> both refuse)
    monkeypatch.setenv("TRITON_INTERPRET", flag)
    if flag == "1":
        resolve_ops("triton", "cpu")
        assert _attention_on_cpu().shape == (1, 16, 2, 16)
        return
    with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1"):
        resolve_ops("triton", "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _attention_on_cpu()
