"""GPTQ against a plain column-by-column oracle, and GPTQ vs RTN measured on held-out data.

The oracle is the GPTQ recursion without its two speed-ups (columns in blocks with lazy batched
updates, and the Cholesky form of the inverse Hessian): quantize one column, spread its error
over the columns not yet quantized through the inverse Hessian, remove the column from the
inverse Hessian (the OBS elimination step), repeat; float64 throughout, with its own quantization
grid written from the format (llmstack/quant/rtn.py's docstring). The blocked float32 version must
give the same codes, scales and zero points.
"""
from __future__ import annotations

import copy

import pytest
import torch

from llmstack.data import build_data, eval_batches
from llmstack.kernels.dequant_matmul import dequantize_int4, dequantize_int8, unpack_int4
from llmstack.model import Llama
from llmstack.quant import quantize_model
from llmstack.quant.gptq import Hessian, gptq_quantize
from llmstack.quant.rtn import quantize_int4, quantize_int8
from tests.helpers import tiny_config

# a code may differ only where the oracle's value w/scale is this close to a rounding tie (in
# quantization steps): float32 against float64 noise, measured up to ~3e-5 here
TIE = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of small per-column ops: a second thread only adds synchronisation (~6x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fp16_up(s: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 number >= s (float64 in and out)."""
    h = s.clamp(2.0 ** -24, 65504.0).half()
    up = torch.nextafter(h, torch.full_like(h, float("inf")))  # the next fp16 above h
    return torch.where(h.double() < s, up.double(), h.double())


def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row as the GPTQ layout holds them (fp16 scales, rounded up; int4 zero
    points in [1, 15]): int8 symmetric max|w|/127; int4 asymmetric over [min(w, 0), max(w, 0)],
    at least max/14 so that a zero point of 1 still reaches max."""
    if bits == 8:
        scale = _fp16_up(w.abs().amax(1) / 127)
        return scale, torch.zeros_like(scale)
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scale = _fp16_up(torch.maximum((hi - lo) / 15, hi / 14))
    return scale, torch.round(-lo / scale).clamp(1, 15)


def gptq_columnwise(W, H, *, bits: int, group_size: int, act_order: bool, damp: float = 0.01, forced=None) -> dict:
    """Codes, scales, zero points and the pre-rounding values w/scale, one column at a time.

    `forced` (codes [N, K]) makes the oracle carry on with those codes instead of its own after
    recording its own rounding: one code flipped at a float32 tie then cannot change the later
    columns, so every column is checked against exactly the state the blocked version had."""
    W, H = W.double().clone(), H.double().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0  # inputs that never fire: nothing to reconstruct
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = -(-K // group_size) if bits == 4 else 1
    scales = torch.zeros(N, n_groups, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    static = bits == 8 or act_order  # grids fixed up front from the original weights
    if static:
        for g in range(n_groups):
            cols = slice(g * group_size, (g + 1) * group_size) if bits == 4 else slice(None)
            scales[:, g], zeros[:, g] = _grid(W[:, cols], bits)
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    lo, hi = (-127, 127) if bits == 8 else (0, 15)
    codes, values = torch.zeros(N, K, dtype=torch.float64), torch.zeros(N, K, dtype=torch.float64)
    for col in order.tolist():
        g = col // group_size if bits == 4 else 0
        if not static and col % group_size == 0:  # the group's grid, from its error-corrected weights
            scales[:, g], zeros[:, g] = _grid(W[:, col:col + group_size], bits)
        s, z = scales[:, g], zeros[:, g]
        values[:, col] = W[:, col] / s
        codes[:, col] = (torch.round(values[:, col]) + z).clamp(lo, hi)
        q = codes[:, col] if forced is None else forced[:, col].double()
        d = Hinv[col, col]
        err = (W[:, col] - (q - z) * s) / d
        W -= err[:, None] * Hinv[col][None, :]  # columns already done have zero rows here
        Hinv -= Hinv[:, col:col + 1] @ Hinv[col:col + 1, :] / d
    return {"codes": codes, "scales": scales, "zeros": zeros, "values": values}


def _inputs(K: int, n: int, seed: int) -> torch.Tensor:
    """Correlated features with uneven scales (where GPTQ differs from RTN); rows are samples."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    scale = torch.rand(K, generator=g) * 3 + 0.1
    return (torch.randn(n, K, generator=g) @ mix) * scale


def _codes(t: dict, bits: int, K: int) -> torch.Tensor:
    return t["qweight"].double() if bits == 8 else unpack_int4(t["qweight"], K).double()


@pytest.mark.parametrize("bits, act_order, block, group", [
    (4, False, 128, 64),  # the defaults' shape: groups inside blocks
    (4, False, 32, 32),  # many blocks, a group per block
    (4, True, 48, 32),  # act-order: static groups, columns permuted across blocks
    (8, False, 48, 32),
    (8, True, 48, 32),
    # groups that start inside a block and end after it (group sizes such as 96 with the default block)
    pytest.param(4, False, 48, 32, id="4-False-48-32-straddling"),
    pytest.param(4, False, 128, 96, id="4-False-128-96-straddling"),
])
def test_blocked_gptq_matches_columnwise_oracle(bits, act_order, block, group):
    N, K = 32, 200  # K not a multiple of the block or the group: partial last ones
    torch.manual_seed(0)
    W = torch.randn(N, K) * 0.05
    x = _inputs(K, 600, seed=0)
    x[:, 7] = 0.0  # a dead input
    h = Hessian(K, "cpu")
    h.add(x)
    t = gptq_quantize(W, h.H, bits=bits, group_size=group, act_order=act_order, block_size=block)
    ours = _codes(t, bits, K)
    ref = gptq_columnwise(W, h.H, bits=bits, group_size=group, act_order=act_order, forced=ours)

    v = ref["values"]
    near_tie = ((v - torch.floor(v)) - 0.5).abs() < TIE
    differ = ours != ref["codes"]
    assert not (differ & ~near_tie).any(), (
        f"{int((differ & ~near_tie).sum())} of {N * K} codes differ from the oracle's away from a rounding tie; "
        f"first at (row, col) {tuple((differ & ~near_tie).nonzero()[0].tolist())}")
    assert int(differ.sum()) <= 2, int(differ.sum())
    scales = t["scales"].double().reshape(N, -1)
    torch.testing.assert_close(scales, ref["scales"], rtol=1e-5, atol=0)
    if bits == 4:
        assert torch.equal(t["zeros"].double(), ref["zeros"])
    assert (ours[:, 7] == (0 if bits == 8 else ref["zeros"][:, 7 // group])).all()  # the dead input stays 0


def _relative_output_error(t: dict, W: torch.Tensor, x: torch.Tensor, bits: int, group: int) -> float:
    K = W.shape[1]
    deq = dequantize_int8(t["qweight"], t["scales"]) if bits == 8 else \
        dequantize_int4(t["qweight"], t["scales"], t["zeros"], group_size=group, in_features=K)
    return float(((x @ (deq - W).t()) ** 2).sum() / ((x @ W.t()) ** 2).sum())


@pytest.mark.parametrize("bits, act_order", [(4, False), (4, True), (8, False)])
def test_gptq_beats_rtn_on_held_out_inputs(bits, act_order):
    """Calibration and held-out rows from the same distribution; the error is measured only on rows
    GPTQ never saw. Measured GPTQ/RTN ratios: 0.64-0.67 (int4), 0.45-0.46 (int4 act-order),
    0.61-0.63 (int8) over three seeds; on the calibration rows themselves they are 0.03-0.04 lower."""
    N, K, group = 64, 256, 64
    torch.manual_seed(0)
    W = torch.randn(N, K) * 0.05
    x = _inputs(K, 4096 + 1024, seed=0)
    calib, held_out = x[:4096], x[4096:]
    h = Hessian(K, "cpu")
    h.add(calib)
    rtn = quantize_int8(W) if bits == 8 else quantize_int4(W, group_size=group)
    gptq = gptq_quantize(W, h.H, bits=bits, group_size=group, act_order=act_order)
    err = {name: _relative_output_error(t, W, held_out, bits, group) for name, t in (("rtn", rtn), ("gptq", gptq))}
    assert err["gptq"] < 0.75 * err["rtn"], err


def test_gptq_model_beats_rtn_on_held_out_text(tmp_path):
    """Whole model, block by block: calibrated on training-split windows, judged on the validation
    split's (other files of the corpus). Measured: relative hidden-state error 1.07e-3 (GPTQ) vs
    1.49e-3 (RTN), ratio 0.72 (0.57 on the calibration windows themselves)."""
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = Llama(cfg.model).eval()
    data = build_data(cfg)
    calib = [data.train.next_batch() for _ in range(3)]
    x = torch.cat([b.input for b in eval_batches(data.val, 3)])
    err = {}
    with torch.no_grad():
        ref = model.hidden_states(x)
        for method in ("rtn", "gptq"):
            m = copy.deepcopy(model)
            quantize_model(m, bits=4, group_size=32, method=method, calib_batches=calib if method == "gptq" else None)
            err[method] = float(((m.hidden_states(x) - ref) ** 2).mean() / (ref ** 2).mean())
    assert err["gptq"] < 0.85 * err["rtn"], err
