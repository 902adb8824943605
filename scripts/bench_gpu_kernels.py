#!/usr/bin/env python
"""GPU kernel benchmarks, ours beside the public baselines, all measured in this one run:

- attention (causal, GQA 32/8 heads) forward and forward+backward vs torch SDPA's flash and
  cuDNN backends (given K/V repeated to 32 heads, which those backends need), TFLOP/s; and packed
  documents: ours with doc_ids (8 documents) vs ours without (the full T^2), ms;
- fused linear + cross-entropy forward+backward vs the naive (logits materialised) version and vs
  Liger-Kernel's fused linear-CE when `liger_kernel` is importable and vs our own loss with the
  old fixed 128-token chunks: ms and peak extra memory;
- gate-up SwiGLU (silu(x Wg^T) * (x Wu^T)) forward and forward+backward vs cuBLAS matmuls with
  the epilogue in eager torch and with the epilogue fused by torch.compile, TFLOP/s;
- int8 / int4 weight-only decode (M = 1 and 4: split-K GEMV; M = 16: tiled) vs the bf16 cuBLAS
  matmul, µs and weight GB/s;
- RMSNorm / RoPE / SwiGLU forward and RMSNorm forward+backward vs eager torch and torch.compile, GB/s.

Timings: triton.testing.do_bench (median, L2 flushed between runs). A row whose kernel fails says
so and the others still run. The 1B training-step MFU is scripts/bench_train.py (bench_gpu.sh).

    python scripts/bench_gpu_kernels.py [--write] [--only attention cross_entropy ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_kernels import MiB, _header, _table, write_section  # noqa: E402

MARKS = ("<!-- bench_gpu_kernels -->", "<!-- /bench_gpu_kernels -->")


def _try(fn):
    try:
        return fn()
    except Exception as e:  # a missing or failing kernel becomes a row, not a crash
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def _ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100)


def _fmt(x, spec="{:.1f}"):
    return spec.format(x) if isinstance(x, (int, float)) else str(x)


def _peak_mib(fn) -> float:
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MiB


def bench_attention(rows):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmstack.kernels.attention import attention_triton
    H, Hkv = 32, 8
    for D, T in ((128, 2048), (128, 4096), (128, 8192), (64, 8192)):
        B = max(1, 16384 // T)
        q, k, v = (torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (H, Hkv, Hkv))
        do = torch.randn_like(q)
        # SDPA's flash / cuDNN kernels want equal head counts: K/V repeated outside the timing
        kr, vr = (t.detach().repeat_interleave(H // Hkv, dim=2).requires_grad_(True) for t in (k, v))
        fwd_flops = 4 * B * H * T * T * D / 2        # QK^T and PV, causal half
        fb_flops = fwd_flops * 3.5                    # backward = 2.5x forward (5 matmuls vs 2)

        def tflops(f, flops, backward):
            def run():
                y = f()
                if backward:
                    y.backward(do)
            return flops / (_ms(run) * 1e-3) / 1e12

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)

        ours = [_try(lambda b=b, fl=fl: tflops(lambda: attention_triton(q, k, v), fl, b))
                for b, fl in ((False, fwd_flops), (True, fb_flops))]
        for backend, name in ((SDPBackend.FLASH_ATTENTION, "SDPA flash"), (SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN")):
            with sdpa_kernel(backend):
                ref = [_try(lambda b=b, fl=fl: tflops(sdpa, fl, b)) for b, fl in ((False, fwd_flops), (True, fb_flops))]
            for what, o, r in zip(("fwd", "fwd+bwd"), ours, ref):
                rows.append([f"attention {what} bf16 causal B={B} T={T} H={H}/{Hkv} D={D}", "TFLOP/s", _fmt(o),
                             _fmt(r), name])
        if T == 8192:
            docs = torch.arange(T, device="cuda").div(T // 8, rounding_mode="floor").expand(B, T).contiguous()

            def step(doc_ids):
                attention_triton(q, k, v, doc_ids=doc_ids).backward(do)
            packed = _try(lambda: _ms(lambda: step(docs)))
            full = _try(lambda: _ms(lambda: step(None)))
            rows.append([f"attention fwd+bwd bf16 T={T} D={D}, 8 packed documents (doc_ids)", "ms", _fmt(packed, "{:.2f}"),
                         _fmt(full, "{:.2f}"), "ours without doc_ids (full causal T^2)"])
        del q, k, v, do, kr, vr
        torch.cuda.empty_cache()


def bench_cross_entropy(rows):
    import torch

    from llmstack.kernels.cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_triton
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        liger = lambda h, w, t: liger_loss(w, h, t)  # noqa: E731
    except ImportError as e:
        liger = None
        liger_missing = f"not importable ({e.name})"
    N = 8192
    for D, V in ((2048, 128256), (4096, 128256), (4096, 32768)):
        h = (torch.randn(N, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5).requires_grad_(True)
        w = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5).requires_grad_(True)
        t = torch.randint(0, V, (N,), device="cuda")

        def measure(fn):
            def step():
                h.grad = w.grad = None
                fn(h, w, t).backward()
            ms = _ms(step)
            h.grad = w.grad = None
            return ms, _peak_mib(step)

        ours = _try(lambda: measure(lambda a, b, c: linear_cross_entropy_triton(a, b, c, reduction="mean")))
        base = [("naive (logits materialised)",
                 _try(lambda: measure(lambda a, b, c: linear_cross_entropy_reference(a, b, c, reduction="mean"))))]
        base.append(("Liger fused linear-CE", _try(lambda: measure(liger)) if liger else liger_missing))
        base.append(("ours with 128-token chunks (the default before the memory-budget chunks)",
                     _try(lambda: measure(lambda a, b, c: linear_cross_entropy_triton(a, b, c, reduction="mean",
                                                                                       chunk_size=128)))))
        for name, ref in base:
            for i, (what, unit, spec) in enumerate((("time", "ms", "{:.1f}"), ("peak extra memory", "MiB", "{:,.0f}"))):
                o = ours[i] if isinstance(ours, tuple) else ours
                r = ref[i] if isinstance(ref, tuple) else ref
                rows.append([f"linear+CE fwd+bwd bf16 N={N} D={D} V={V}: {what}", unit, _fmt(o, spec), _fmt(r, spec),
                             name])
        del h, w, t
        torch.cuda.empty_cache()


def bench_gate_up(rows):
    import torch
    import torch.nn.functional as F

    from llmstack.kernels.matmul import gate_up_swiglu_triton

    def eager(x, wg, wu):
        return F.silu(x @ wg.t()) * (x @ wu.t())
    compiled = torch.compile(eager)
    for M, K, Hd in ((8192, 2048, 8192), (8192, 4096, 14336)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        wg, wu = ((torch.randn(Hd, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5).requires_grad_(True)
                  for _ in range(2))
        dy = torch.randn(M, Hd, device="cuda", dtype=torch.bfloat16)
        fwd = 2 * 2 * M * Hd * K
        for what, flops in (("fwd", fwd), ("fwd+bwd", 3 * fwd)):    # backward: dx, dWg, dWu = 2x forward

            def tflops(fn):
                def run():
                    if what == "fwd":
                        with torch.no_grad():
                            fn(x, wg, wu)
                    else:
                        fn(x, wg, wu).backward(dy)
                return flops / (_ms(run) * 1e-3) / 1e12
            ours = _try(lambda: tflops(gate_up_swiglu_triton))
            for name, fn in (("cuBLAS + eager epilogue", eager), ("cuBLAS + torch.compile epilogue", compiled)):
                rows.append([f"gate-up SwiGLU {what} bf16 M={M} K={K} H={Hd}", "TFLOP/s", _fmt(ours),
                             _fmt(_try(lambda: tflops(fn))), name])
        del x, wg, wu, dy
        torch.cuda.empty_cache()


def bench_decode(rows):
    import torch

    from llmstack.kernels.dequant_matmul import dequant_matmul, pack_int4
    G = 128
    for K, N in ((4096, 14336), (14336, 4096), (2048, 8192)):
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        q8 = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        s8 = torch.rand(N, device="cuda", dtype=torch.bfloat16) / 64
        q4 = pack_int4(torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8))
        s4 = torch.rand(N, K // G, device="cuda", dtype=torch.bfloat16) / 8
        z4 = torch.randint(0, 16, (N, K // G), device="cuda", dtype=torch.uint8)
        for M in (1, 4, 16):   # 1 and 4: split-K GEMV; 16: the 16-row tiled kernel
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            bf16 = _try(lambda: _ms(lambda: x @ w.t()) * 1e3)
            for bits, nbytes, call in (
                    (8, N * K, lambda: dequant_matmul(x, q8, s8, bits=8, in_features=K, backend="triton")),
                    (4, N * K // 2, lambda: dequant_matmul(x, q4, s4, z4, bits=4, group_size=G, in_features=K,
                                                           backend="triton"))):
                us = _try(lambda: _ms(call) * 1e3)
                gbps = _fmt(nbytes / (us * 1e-6) / 1e9, "{:.0f}") if isinstance(us, float) else us
                rows.append([f"int{bits} decode M={M} K={K} N={N} (weights {gbps} GB/s)", "µs", _fmt(us),
                             _fmt(bf16), f"bf16 x @ W.T (cuBLAS, {2 * N * K / 1e6:.0f} MB of weights)"])
        del w, q8, q4
        torch.cuda.empty_cache()


def bench_elementwise(rows):
    import importlib

    import torch
    B, T, dim, H, D, ffn = 8, 4096, 4096, 32, 128, 14336
    dt = torch.bfloat16
    x = torch.randn(B * T, dim, device="cuda", dtype=dt)
    w = torch.ones(dim, device="cuda", dtype=dt)
    q = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    k = torch.randn(B, T, 8, D, device="cuda", dtype=dt)
    ang = torch.outer(torch.arange(T, device="cuda").float(), torch.rand(D // 2, device="cuda"))
    g, u = torch.randn(B * T, ffn, device="cuda", dtype=dt), torch.randn(B * T, ffn, device="cuda", dtype=dt)
    cases = [("rmsnorm", "rms_norm", (x, w, 1e-5), 2 * x.nbytes, f"RMSNorm fwd [{B * T}, {dim}] bf16"),
             ("rope", "rope", (q, k, ang.cos(), ang.sin(), None), 2 * (q.nbytes + k.nbytes),
              f"RoPE fwd q[{B},{T},{H},{D}] k[.., 8, {D}] bf16"),
             ("swiglu", "swiglu", (g, u), 3 * g.nbytes, f"SwiGLU fwd [{B * T}, {ffn}] bf16")]
    with torch.no_grad():
        for mod_name, op, fargs, nbytes, label in cases:
            mod = importlib.import_module(f"llmstack.kernels.{mod_name}")
            ours_fn, eager_fn = getattr(mod, f"{op}_triton"), getattr(mod, f"{op}_torch")
            ours = _try(lambda: nbytes / (_ms(lambda: ours_fn(*fargs)) * 1e-3) / 1e9)
            for name, fn in (("torch eager", eager_fn), ("torch.compile", torch.compile(eager_fn))):
                ref = _try(lambda: nbytes / (_ms(lambda: fn(*fargs)) * 1e-3) / 1e9)
                rows.append([label, "GB/s", _fmt(ours, "{:.0f}"), _fmt(ref, "{:.0f}"), name])
    # RMSNorm forward + backward (the backward runs several programs per SM, dW partials in fp32)
    from llmstack.kernels.rmsnorm import rms_norm_torch, rms_norm_triton
    xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    dy = torch.randn_like(x)
    nbytes = 5 * x.nbytes   # fwd: read x, write y; bwd: read x and dy, write dx

    def fwd_bwd(fn):
        return lambda: fn(xg, wg, 1e-5).backward(dy)
    ours = _try(lambda: nbytes / (_ms(fwd_bwd(rms_norm_triton)) * 1e-3) / 1e9)
    for name, fn in (("torch eager", rms_norm_torch), ("torch.compile", torch.compile(rms_norm_torch))):
        ref = _try(lambda: nbytes / (_ms(fwd_bwd(fn)) * 1e-3) / 1e9)
        rows.append([f"RMSNorm fwd+bwd [{B * T}, {dim}] bf16", "GB/s", _fmt(ours, "{:.0f}"), _fmt(ref, "{:.0f}"), name])


PARTS = {"attention": bench_attention, "cross_entropy": bench_cross_entropy, "gate_up": bench_gate_up,
         "decode": bench_decode, "elementwise": bench_elementwise}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=sorted(PARTS), help="parts to run (default: all)")
    p.add_argument("--write", action="store_true", help="replace this script's section in BENCHMARKS.md")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_kernels.py: no CUDA device visible to torch")
    rows: list[list] = []
    for name in args.only or PARTS:
        try:
            PARTS[name](rows)
        except Exception as e:  # a whole part failing (import, OOM) is a row, the others still run
            rows.append([name, "-", f"error: {type(e).__name__}: {e}"[:160], "", ""])
        print(f"  {name} done", file=sys.stderr, flush=True)
    argv_s = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write")
    lines = _header(f"GPU, {torch.cuda.get_device_name()}", f"python scripts/bench_gpu_kernels.py {argv_s} --write")
    lines += ["", "Ours and the baseline in each row were measured in this run on this GPU (triton.testing.do_bench "
                  "median). Higher is better for TFLOP/s and GB/s; lower for ms, µs and MiB.", ""]
    lines += _table(["benchmark", "unit", "ours (Triton)", "baseline", "baseline is"], rows)
    print("\n".join(lines))
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", MARKS, lines)
        print("wrote the bench_gpu_kernels section of BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
