"""What the compile gate (`llmstack.kernels.compile_check`) compiles: every kernel, through its
public entry (forward and backward), at the model shapes it runs at.

Shapes (batch 1): "1b" = dim 2048, 32 query / 8 kv heads of 64, FFN 8192, vocab 128,256,
T 8192; "8b" = dim 4096, 32 / 8 heads of 128, FFN 14336, vocab 128,256, T 4096.

`full_jobs()`: sm_90 and sm_80, both shapes, bf16 / fp16 / fp32 wherever the entry accepts it,
attention causal with and without packed documents plus non-causal and head dims 96 / 256,
the loss options, decode (M = 1, 4: split-K GEMV; M = 16: the 16-row tile) and prefill for the
quantized matmuls.
`subset_jobs()` (run by `make test`): every kernel and every config its autotuner can pick at
the main shape (sm_90, bf16, 8b), and sm_80 for attention and the gate-up matmul (whose backward
reaches the SPLIT_B dx GEMM and the [dWg; dWu] GEMM).
Job names start with the kernel family and the shape (a worker compiles one such bundle), then
dtype and variant.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

import torch

import llmstack.kernels as kernels_package
from llmstack.kernels.compile_check import Job, Record, Waiver, fake

SHAPES = {
    "1b": dict(dim=2048, heads=32, kv=8, hd=64, ffn=8192, vocab=128256, T=8192),
    "8b": dict(dim=4096, heads=32, kv=8, hd=128, ffn=14336, vocab=128256, T=4096),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DECODE_TILE = Waiver("wgmma", "dequant 16-row decode tile (4 < M <= 16): wgmma needs 64-row tiles, the weight "
                              "stream is the cost")
# Known and measured, kept visible in the table: every tile shape tried for the head-dim-256
# dK/dV kernel on sm_90 spills (two sweeps, dV then dK, cut it from 244-4,600 B to 28-116 B).
WAIVERS = (Waiver("spills", "head dim 256 dK/dV on sm_90: no spill-free tile found (28-116 B left after the "
                            "two-sweep split); open", kernel="bwd_dkdv", config="BLOCK_D=256"),)


def _attention(s, dt, *, causal=True, docs=False, hd=None, T=None):
    from llmstack.kernels.attention import attention_triton
    hd = hd or s["hd"]
    T = T or s["T"]
    q = fake(1, T, s["heads"], hd, dtype=dt, grad=True)
    k = fake(1, T, s["kv"], hd, dtype=dt, grad=True)
    v = fake(1, T, s["kv"], hd, dtype=dt, grad=True)
    doc_ids = fake(1, T, dtype=torch.int64) if docs else None
    attention_triton(q, k, v, causal=causal, doc_ids=doc_ids)


def _gate_up(s, dt):
    from llmstack.kernels.matmul import gate_up_swiglu_triton
    x = fake(s["T"], s["dim"], dtype=dt, grad=True)
    gate_up_swiglu_triton(x, fake(s["ffn"], s["dim"], dtype=dt, grad=True), fake(s["ffn"], s["dim"], dtype=dt, grad=True))


def _matmul_epilogue(s, dt):
    from llmstack.kernels.matmul import matmul_triton
    a = fake(s["T"], s["dim"], dtype=dt)
    matmul_triton(a, fake(s["ffn"], s["dim"], dtype=dt), bias=fake(s["ffn"], dtype=dt), activation="gelu",
                  residual=fake(s["T"], s["ffn"], dtype=dt))


def _ce(s, dt, **options):
    from llmstack.kernels.cross_entropy import linear_cross_entropy_triton
    h = fake(s["T"], s["dim"], dtype=dt, grad=True)
    w = fake(s["vocab"], s["dim"], dtype=dt, grad=True)
    linear_cross_entropy_triton(h, w, fake(s["T"], dtype=torch.int64), reduction="mean", **options)


def _kd(s, dt, kind):
    from llmstack.kernels.kd_loss import kd_loss_triton
    h = fake(s["T"], s["dim"], dtype=dt, grad=True)
    w = fake(s["vocab"], s["dim"], dtype=dt, grad=True)
    kd_loss_triton(h, w, fake(s["T"], dtype=torch.int64), h_t=fake(s["T"], s["dim"], dtype=dt),
                   w_t=fake(s["vocab"], s["dim"], dtype=dt), kind=kind, temperature=2.0)


def _rmsnorm(s, dt, residual=False, stream_dtype=None):
    """residual: the fused add+norm the model's blocks call. stream_dtype: the residual stream's
    dtype when it is wider than the weight's (under autocast a bf16 branch output meets an fp32
    stream and both are promoted before the kernels); the branch is made in that dtype here,
    since the promoting cast is autograd work that fake CUDA tensors cannot record, and the
    kernels see the same operands either way."""
    from llmstack.kernels.rmsnorm import rms_norm_residual_triton, rms_norm_triton
    x = fake(1, s["T"], s["dim"], dtype=stream_dtype or dt, grad=True)
    w = fake(s["dim"], dtype=dt, grad=True)
    if residual:
        rms_norm_residual_triton(x, fake(1, s["T"], s["dim"], dtype=stream_dtype or dt, grad=True), w, 1e-5)
    else:
        rms_norm_triton(x, w, 1e-5)


def _rope(s, dt, positions=False):
    from llmstack.kernels.rope import rope_triton
    q = fake(1, s["T"], s["heads"], s["hd"], dtype=dt, grad=True)
    k = fake(1, s["T"], s["kv"], s["hd"], dtype=dt, grad=True)
    table = (s["T"], s["hd"] // 2)
    pos = fake(1, s["T"], dtype=torch.int64) if positions else None
    rope_triton(q, k, fake(*table, dtype=torch.float32), fake(*table, dtype=torch.float32), pos)


def _swiglu(s, dt):
    from llmstack.kernels.swiglu import swiglu_triton
    swiglu_triton(fake(1, s["T"], s["ffn"], dtype=dt, grad=True), fake(1, s["T"], s["ffn"], dtype=dt, grad=True))


def _dequant(s, dt, bits, M):
    from llmstack.kernels.dequant_matmul import dequant_matmul
    K, N, G = s["dim"], s["ffn"], 128
    x = fake(M, K, dtype=dt)
    if bits == 8:
        dequant_matmul(x, fake(N, K, dtype=torch.int8), fake(N, dtype=dt), bits=8, in_features=K, backend="triton")
    else:
        dequant_matmul(x, fake(N, K // 2, dtype=torch.uint8), fake(N, K // G, dtype=dt),
                       fake(N, K // G, dtype=torch.uint8), bits=4, group_size=G, in_features=K, backend="triton")


def _job(arch, name, fn, *args, waive=(), **kw) -> Job:
    return Job(arch=arch, name=name, case=functools.partial(fn, *args, **kw), waivers=tuple(waive) + WAIVERS)


def _family_jobs(arch: int, shape: str, dtype: str, *, full: bool) -> list[Job]:
    s, dt = SHAPES[shape], DTYPES[dtype]
    tag = f"{shape} {dtype}"
    jobs = [
        _job(arch, f"attention {tag} causal", _attention, s, dt),
        _job(arch, f"attention {tag} causal+docs", _attention, s, dt, docs=True),
        _job(arch, f"gate_up {tag}", _gate_up, s, dt),
        _job(arch, f"cross_entropy {tag}", _ce, s, dt),
        _job(arch, f"rmsnorm {tag}", _rmsnorm, s, dt),
        _job(arch, f"rmsnorm {tag} +residual", _rmsnorm, s, dt, residual=True),
        _job(arch, f"rmsnorm {tag} +residual fp32 stream", _rmsnorm, s, dt, residual=True,
             stream_dtype=torch.float32),
        _job(arch, f"rope {tag}", _rope, s, dt),
        _job(arch, f"swiglu {tag}", _swiglu, s, dt),
    ]
    jobs += [_job(arch, f"kd_loss {tag} {kind}", _kd, s, dt, kind) for kind in ("forward_kl", "reverse_kl", "jsd")]
    for bits in (8, 4):
        # M = 1 and 4: the split-K GEMV (no tl.dot); M = T: the tiled prefill GEMM
        jobs += [_job(arch, f"dequant {tag} int{bits} M={m}", _dequant, s, dt, bits, m) for m in (1, 4, s["T"])]
    if full:
        jobs += [
            _job(arch, f"attention {tag} full", _attention, s, dt, causal=False),
            _job(arch, f"matmul {tag} bias+gelu+residual", _matmul_epilogue, s, dt),
            _job(arch, f"cross_entropy {tag} softcap+zloss+smoothing", _ce, s, dt, softcap=30.0, z_loss=1e-4,
                 label_smoothing=0.1),
            _job(arch, f"rope {tag} position_ids", _rope, s, dt, positions=True),
        ]
        jobs += [_job(arch, f"dequant {tag} int{bits} M=16", _dequant, s, dt, bits, 16, waive=[DECODE_TILE])
                 for bits in (8, 4)]
        if shape == "8b":
            jobs += [_job(arch, f"attention {tag} causal hd{hd}", _attention, s, dt, hd=hd) for hd in (96, 256)]
    return jobs


def subset_jobs() -> list[Job]:
    jobs = _family_jobs(90, "8b", "bf16", full=False)
    jobs += [j for j in _family_jobs(80, "8b", "bf16", full=False) if j.name.split(" ")[0] in ("attention", "gate_up")]
    return jobs


def full_jobs() -> list[Job]:
    return [j for arch in (90, 80) for shape in SHAPES for dtype in DTYPES
            for j in _family_jobs(arch, shape, dtype, full=True)]


@functools.lru_cache(maxsize=1)
def jobs_by_name() -> dict[tuple[int, str], Job]:
    return {(j.arch, j.name): j for j in full_jobs() + subset_jobs()}


def launchable_kernels() -> set[str]:
    """Names of the Triton kernels in llmstack.kernels that can be launched (they read
    tl.program_id), whatever module they are in: a new kernel without a gate case shows up here."""
    names = set()
    for info in pkgutil.iter_modules(kernels_package.__path__):
        if info.name.startswith("compile_"):
            continue
        mod = importlib.import_module(f"{kernels_package.__name__}.{info.name}")
        for obj in vars(mod).values():
            fn = obj
            while hasattr(fn, "fn") and not inspect.isfunction(fn):
                fn = fn.fn
            if inspect.isfunction(fn) and fn is not obj and fn.__module__ == mod.__name__:
                if "program_id" in inspect.getsource(fn):
                    names.add(fn.__name__)
    return names


def uncovered(records: list[Record]) -> list[str]:
    compiled = {r.kernel for r in records if not r.error}
    return sorted(launchable_kernels() - compiled)
