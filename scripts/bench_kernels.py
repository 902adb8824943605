#!/usr/bin/env python
"""Kernel benchmarks.

CPU part (always runs): peak memory and time of the fused linear + cross-entropy as the model
calls it (`LMHead.loss`, default chunking), forward + backward, against the naive version that
materialises the [N, V] logits and, with `--baseline REV`, against the same call at an earlier
commit (its `llmstack` package unpacked from git into a temporary folder, run in the same session
so that both see the same machine load). Every variant runs in its own fresh subprocess, so one run's allocations
cannot hide inside another's: the child builds its inputs, reads its current RSS
(/proc/self/statm), runs one forward + backward, then reads `ru_maxrss` (the kernel's record of the
process's peak resident set). Peak growth = ru_maxrss after - RSS before: everything the step
allocated at its high point (logits, softmax buffers, grad_h, grad_W). torch's CPU allocator hands
big blocks straight to/from the OS (mmap), so RSS follows live tensors. The time is the median of
further runs in the same child.

GPU part (only when torch.cuda.is_available()): attention vs torch SDPA flash (TFLOP/s), matmul
and fused gate-up SwiGLU vs torch.matmul (TFLOP/s), RMSNorm / RoPE / SwiGLU vs eager and
torch.compile (GB/s), fused linear + CE vs naive (time and peak memory). A kernel that is missing or
fails is reported as such in its row; the other rows still run.

    python scripts/bench_kernels.py            # print the table(s)
    python scripts/bench_kernels.py --write    # also replace the sections in BENCHMARKS.md
    python scripts/bench_kernels.py --cpu-only --baseline cf2d641 --cpu-chunks 1024 --write   # before/after
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmstack.perf import cpu_name  # noqa: E402

CPU_MARK = ("<!-- bench_kernels:cpu -->", "<!-- /bench_kernels:cpu -->")
GPU_MARK = ("<!-- bench_kernels:gpu -->", "<!-- /bench_kernels:gpu -->")
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# common
# ---------------------------------------------------------------------------------------------

def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def _header(device: str, command: str) -> list[str]:
    import torch
    import triton
    return [f"- device: {device}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
            f"- git commit: {_git_commit()}",
            f"- command: `{command}`"]


def _command() -> str:
    """The command line that reproduces this run (--write added: it is what refreshes the file)."""
    argv = [a for a in sys.argv[1:] if a != "--write"]
    return " ".join(["python scripts/bench_kernels.py", *argv, "--write"])


def _table(cols: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


# ---------------------------------------------------------------------------------------------
# CPU: the model's LM-head loss (current code, and a baseline commit) vs naive, one subprocess per row
# ---------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_child(spec: dict) -> dict:
    if spec.get("root"):  # the baseline commit's llmstack package wins over this checkout's
        sys.path.insert(0, spec["root"])
        for name in [m for m in sys.modules if m == "llmstack" or m.startswith("llmstack.")]:
            del sys.modules[name]
    import torch
    import llmstack
    from llmstack.kernels import torch_ops
    from llmstack.kernels.cross_entropy import linear_cross_entropy_reference
    from llmstack.model import LMHead

    torch.manual_seed(0)
    N, D, V = spec["n"], spec["d"], spec["v"]
    dtype = getattr(torch, spec["dtype"])
    head = LMHead(D, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D) / D ** 0.5)
    head = head.to(dtype)
    h = (torch.randn(N, D) / D ** 0.5).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,))
    ops = torch_ops()
    if spec["variant"] == "naive":
        def loss_fn():
            return linear_cross_entropy_reference(h, head.weight, t, reduction="mean")
    else:  # the model's own loss call, with that revision's default chunking (chunk_size=0)
        def loss_fn():
            return head.loss(h, t, ops, reduction="mean", chunk_size=spec["chunk"])

    def step():
        h.grad = None
        head.weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.item()

    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"peak_growth": peak - rss0, "time": statistics.median(times) if times else first, "loss": loss,
            "threads": torch.get_num_threads(), "code": str(Path(llmstack.__file__).parent)}


def _baseline_tree(rev: str, tmp: str) -> str:
    """The llmstack package as of commit `rev`, unpacked under tmp (read from git objects)."""
    archive = subprocess.run(["git", "archive", rev, "llmstack"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    return tmp


def run_cpu(args) -> list[str]:
    import tempfile

    from llmstack.kernels.chunked_loss import LOGITS_BUDGET_BYTES
    tmp = tempfile.TemporaryDirectory()
    base_root = _baseline_tree(args.baseline, tmp.name) if args.baseline else None
    base_sha = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() if args.baseline else None
    variants = [("naive", None, 0)]
    if base_root:
        variants.append((f"model loss @ {base_sha} (baseline)", base_root, 0))
    variants.append(("model loss @ this commit", None, 0))
    variants += [(f"this commit, chunk {c}", None, c) for c in args.cpu_chunks]
    rows = []
    threads = None
    for V in args.cpu_vocabs:
        ref = None
        for name, root, chunk in variants:
            if name == "naive" and V > args.cpu_naive_max_vocab:
                continue
            spec = {"variant": "naive" if name == "naive" else "model", "n": args.cpu_n, "d": args.cpu_d, "v": V,
                    "chunk": chunk, "repeats": args.cpu_repeats, "dtype": args.cpu_dtype, "root": root}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, cwd=ROOT)
            if proc.returncode != 0:
                rows.append([f"{V:,}", name, "failed: " + " ".join(proc.stderr.strip().splitlines()[-1:]), "", "", "", ""])
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            threads = res["threads"]
            if ref is None and name != "naive":
                ref = res  # the first model-loss row (the baseline when given) is what the others are compared with
            vs = "-" if res is ref or name == "naive" or ref is None else \
                f"memory {res['peak_growth'] / ref['peak_growth']:.2f}x, speed {ref['time'] / res['time']:.2f}x"
            rows.append([f"{V:,}", name, f"{res['peak_growth'] / MiB:,.0f}", f"{res['time']:.2f}", vs,
                         f"{res['loss']:.4f}"])
            print(f"  V={V} {name}: peak +{res['peak_growth'] / MiB:.0f} MiB, {res['time']:.2f} s", file=sys.stderr)
    tmp.cleanup()
    N, D = args.cpu_n, args.cpu_d
    lines = _header(f"CPU, {cpu_name()}, {threads} torch threads (other jobs may share the cores)",
                    _command())
    lines += ["",
              f"Fused linear + cross-entropy through the model's LM-head loss (`LMHead.loss`, each revision's default "
              f"chunking), forward + backward, {args.cpu_dtype}, N={N:,} tokens, D={D}, reduction=mean"
              + (f"; the baseline is commit {base_sha}, run in the same session (its `llmstack` package unpacked "
                 f"from git)" if base_sha else "") + ". "
              f"Peak memory = growth of the process's peak RSS during one fwd+bwd (fresh subprocess per row; "
              f"inputs excluded, grad_h/grad_W included). Time = median of {args.cpu_repeats} further runs. "
              f"For scale: one fp32 [N, V] logits tensor is {N * 4 / MiB:.3f} MiB per vocab entry "
              f"(N x V x 4 B). This commit's chunks come from the loss driver's CPU budget "
              f"({LOGITS_BUDGET_BYTES['cpu'] // MiB} MiB of logits); a fixed-chunk row of 1,024 tokens is what the "
              f"GPU budget ({LOGITS_BUDGET_BYTES['cuda'] // MiB} MiB) picks for fp32 logits at a 128k vocabulary.",
              ""]
    lines += _table(["V", "variant", "peak MiB", "fwd+bwd s", "vs the first model-loss row (ratio)", "loss"], rows)
    return lines


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def _bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100)


def _try(fn):
    try:
        return fn()
    except Exception as e:  # a missing or failing kernel becomes a row, not a crash
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def _fmt(x, spec="{:.1f}"):
    return spec.format(x) if isinstance(x, (int, float)) else str(x)


def gpu_attention(rows):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from llmstack.kernels.attention import attention_triton
    except Exception as e:  # colleague's kernel not there
        attention_triton = None
        missing = f"error: {e}"
    H, D = 16, 128
    for T in (1024, 2048, 4096, 8192, 16384):
        B = max(1, 16384 // T)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        # causal forward: QK^T and PV, 2 FLOPs per MAC, half the score matrix -> 4*B*H*T^2*D / 2
        fwd_flops = 4 * B * H * T * T * D / 2
        # backward recomputes QK^T (1) and computes dV, dP, dQ, dK (4): 5 matmuls vs the forward's 2,
        # i.e. 2.5x the forward FLOPs; fwd+bwd = 3.5x forward
        fb_flops = fwd_flops * 3.5

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)

        def tflops(f, flops, backward):
            def run():
                y = f()
                if backward:
                    y.backward(do)
            return flops / (_bench_ms(run) * 1e-3) / 1e12

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref_f = _try(lambda: tflops(sdpa, fwd_flops, False))
            ref_fb = _try(lambda: tflops(sdpa, fb_flops, True))
        if attention_triton is None:
            ours_f = ours_fb = missing
        else:
            ours_f = _try(lambda: tflops(lambda: attention_triton(q, k, v, causal=True), fwd_flops, False))
            ours_fb = _try(lambda: tflops(lambda: attention_triton(q, k, v, causal=True), fb_flops, True))
        rows.append([f"attention fwd, causal, B={B} T={T} H={H} D={D}", "TFLOP/s", _fmt(ours_f), _fmt(ref_f),
                     "torch SDPA flash"])
        rows.append([f"attention fwd+bwd, causal, B={B} T={T} H={H} D={D}", "TFLOP/s", _fmt(ours_fb), _fmt(ref_fb),
                     "torch SDPA flash"])
        del q, k, v, do


def gpu_matmul(rows):
    import torch
    import torch.nn.functional as F
    from llmstack.kernels.matmul import gate_up_swiglu_triton, matmul_triton

    for M, N, K in ((4096, 4096, 4096), (8192, 8192, 8192), (8192, 11008, 4096), (16384, 4096, 11008)):
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        fl = 2 * M * N * K
        ours = _try(lambda: fl / (_bench_ms(lambda: matmul_triton(a, b)) * 1e-3) / 1e12)
        ref = _try(lambda: fl / (_bench_ms(lambda: a @ b.t()) * 1e-3) / 1e12)
        rows.append([f"matmul bf16 {M}x{N}x{K}", "TFLOP/s", _fmt(ours), _fmt(ref), "torch.matmul (cuBLAS)"])
    for M, K, Hd in ((8192, 4096, 11008), (16384, 2048, 5632)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        wg = torch.randn(Hd, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        wu = torch.randn(Hd, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        fl = 2 * 2 * M * Hd * K
        with torch.no_grad():
            ours = _try(lambda: fl / (_bench_ms(lambda: gate_up_swiglu_triton(x, wg, wu)) * 1e-3) / 1e12)
            ref = _try(lambda: fl / (_bench_ms(lambda: F.silu(x @ wg.t()) * (x @ wu.t())) * 1e-3) / 1e12)
        rows.append([f"gate-up SwiGLU fwd bf16 M={M} K={K} H={Hd}", "TFLOP/s", _fmt(ours), _fmt(ref),
                     "eager: 2 matmuls + silu*mul"])


def gpu_elementwise(rows):
    import importlib

    import torch

    def gbps(nbytes, f):
        return nbytes / (_bench_ms(f) * 1e-3) / 1e9

    B, T, dim, H, D = 8, 4096, 4096, 32, 128
    dt = torch.bfloat16
    x = torch.randn(B * T, dim, device="cuda", dtype=dt)
    w = torch.ones(dim, device="cuda", dtype=dt)
    q = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    k = torch.randn(B, T, 8, D, device="cuda", dtype=dt)
    ang = torch.outer(torch.arange(T, device="cuda").float(), torch.rand(D // 2, device="cuda"))
    cos, sin = ang.cos(), ang.sin()
    g, u = torch.randn(B * T, 11008, device="cuda", dtype=dt), torch.randn(B * T, 11008, device="cuda", dtype=dt)
    cases = [
        ("rmsnorm", "rms_norm", (x, w, 1e-5), 2 * x.numel() * x.element_size(), f"RMSNorm fwd [{B * T}, {dim}] bf16"),
        ("rope", "rope", (q, k, cos, sin, None), 2 * (q.numel() + k.numel()) * q.element_size(),
         f"RoPE fwd q[{B},{T},{H},{D}] k[.., 8, {D}] bf16"),
        ("swiglu", "swiglu", (g, u), 3 * g.numel() * g.element_size(), f"SwiGLU fwd [{B * T}, 11008] bf16"),
    ]
    with torch.no_grad():
        for mod_name, op, fargs, nbytes, label in cases:
            mod = importlib.import_module(f"llmstack.kernels.{mod_name}")
            ours_fn = getattr(mod, f"{op}_triton", None)
            eager_fn = getattr(mod, f"{op}_torch")
            ours = _try(lambda: gbps(nbytes, lambda: ours_fn(*fargs))) if ours_fn else "missing"
            eager = _try(lambda: gbps(nbytes, lambda: eager_fn(*fargs)))
            comp = _try(lambda: gbps(nbytes, lambda f=torch.compile(eager_fn): f(*fargs)))
            rows.append([label, "GB/s", _fmt(ours, "{:.0f}"), _fmt(eager, "{:.0f}"), "torch eager"])
            rows.append([label, "GB/s", _fmt(ours, "{:.0f}"), _fmt(comp, "{:.0f}"), "torch.compile"])


def gpu_cross_entropy(rows):
    import torch
    from llmstack.kernels.cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_triton

    N, D = 8192, 4096
    for V in (32768, 131072):
        h = (torch.randn(N, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5).requires_grad_(True)
        w = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5).requires_grad_(True)
        t = torch.randint(0, V, (N,), device="cuda")

        def measure(fn, **kw):
            def step():
                h.grad = w.grad = None
                fn(h, w, t, reduction="mean", **kw).backward()
            ms = _bench_ms(step)
            h.grad = w.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            return ms, (torch.cuda.max_memory_allocated() - base) / MiB

        ours = _try(lambda: measure(linear_cross_entropy_triton))  # chunks from the memory budget
        small = _try(lambda: measure(linear_cross_entropy_triton, chunk_size=128))
        ref = _try(lambda: measure(linear_cross_entropy_reference))
        for i, (what, unit, spec) in enumerate((("time", "ms", "{:.1f}"), ("peak extra memory", "MiB", "{:,.0f}"))):
            o, sm, r = (x[i] if isinstance(x, tuple) else x for x in (ours, small, ref))
            rows.append([f"linear+CE fwd+bwd bf16 N={N} D={D} V={V}: {what}", unit, _fmt(o, spec), _fmt(r, spec),
                         "naive (logits materialised)"])
            rows.append([f"linear+CE fwd+bwd bf16 N={N} D={D} V={V}: {what}", unit, _fmt(o, spec), _fmt(sm, spec),
                         "ours with 128-token chunks (the previous default)"])
        del h, w, t
        torch.cuda.empty_cache()


def gpu_backward(rows):
    """The fused backwards: gate-up SwiGLU (fused SwiGLU backward + one dx GEMM) and RMSNorm
    (several programs per SM), fwd+bwd against eager torch."""
    import torch
    import torch.nn.functional as F
    from llmstack.kernels.matmul import gate_up_swiglu_triton
    from llmstack.kernels.rmsnorm import rms_norm_torch, rms_norm_triton

    M, K, Hd = 8192, 4096, 14336
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wg = (torch.randn(Hd, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5).requires_grad_(True)
    wu = (torch.randn(Hd, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5).requires_grad_(True)
    go = torch.randn(M, Hd, device="cuda", dtype=torch.bfloat16)
    fl = 3 * 2 * 2 * M * Hd * K  # forward 2 GEMMs, backward 4 (dx over 2H counts as 2)

    def fwd_bwd(f):
        return lambda: f(x, wg, wu).backward(go)

    ours = _try(lambda: fl / (_bench_ms(fwd_bwd(gate_up_swiglu_triton)) * 1e-3) / 1e12)
    ref = _try(lambda: fl / (_bench_ms(fwd_bwd(lambda a, b, c: F.silu(a @ b.t()) * (a @ c.t()))) * 1e-3) / 1e12)
    rows.append([f"gate-up SwiGLU fwd+bwd bf16 M={M} K={K} H={Hd}", "TFLOP/s", _fmt(ours), _fmt(ref),
                 "eager: cuBLAS matmuls + silu*mul"])
    del x, wg, wu, go
    xs = torch.randn(8 * 4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(xs)
    nbytes = 5 * xs.numel() * xs.element_size()  # fwd: read x, write y; bwd: read x, dy, write dx

    def gbps(f):
        return nbytes / (_bench_ms(lambda: f(xs, w, 1e-5).backward(gy)) * 1e-3) / 1e9

    ours = _try(lambda: gbps(rms_norm_triton))
    for name, f in (("torch eager", rms_norm_torch), ("torch.compile", torch.compile(rms_norm_torch))):
        rows.append([f"RMSNorm fwd+bwd [{xs.shape[0]}, 4096] bf16", "GB/s", _fmt(ours, "{:.0f}"),
                     _fmt(_try(lambda: gbps(f)), "{:.0f}"), name])


def gpu_decode(rows):
    """Weight-only int8/int4 matmul at decode sizes (split-K GEMV for M <= 4) vs a bf16 matmul."""
    import torch
    from llmstack.kernels.dequant_matmul import int4_matmul_triton, int8_matmul_triton
    from llmstack.quant.rtn import quantize_int4, quantize_int8

    for N, K in ((4096, 4096), (14336, 4096), (4096, 14336)):
        w = torch.randn(N, K, device="cuda") * 0.02
        wb = w.bfloat16()
        q8, q4 = quantize_int8(w), quantize_int4(w, 128)
        s8, s4 = q8["scales"].bfloat16(), q4["scales"].bfloat16()
        for M in (1, 4, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            cases = (("int8", N * K, lambda: int8_matmul_triton(x, q8["qweight"], s8)),
                     ("int4 g128", N * K // 2, lambda: int4_matmul_triton(x, q4["qweight"], s4, q4["zeros"], 128, K)))
            ref_us = _try(lambda: _bench_ms(lambda: x @ wb.t()) * 1e3)
            for name, nbytes, f in cases:
                us = _try(lambda: _bench_ms(f) * 1e3)
                gbs = nbytes / (us * 1e-6) / 1e9 if isinstance(us, float) else us
                rows.append([f"{name} dequant matmul M={M} N={N} K={K} ({_fmt(gbs, '{:.0f}')} GB/s of weights)", "us",
                             _fmt(us), _fmt(ref_us), "bf16 torch matmul (cuBLAS)"])


def run_gpu(args) -> list[str]:
    import torch
    rows: list[list] = []
    for part in (gpu_attention, gpu_matmul, gpu_backward, gpu_elementwise, gpu_cross_entropy, gpu_decode):
        try:
            part(rows)
        except Exception as e:
            rows.append([part.__name__, "-", f"error: {type(e).__name__}: {e}"[:120], "", ""])
        print(f"  {part.__name__} done", file=sys.stderr)
    lines = _header(f"GPU, {torch.cuda.get_device_name()}", _command())
    lines += ["", "Higher is better for TFLOP/s and GB/s; lower for ms and MiB. Attention fwd+bwd counts the "
                  "backward as 2.5x the forward FLOPs (5 matmuls vs 2).", ""]
    lines += _table(["benchmark", "unit", "ours (Triton)", "baseline", "baseline is"], rows)
    return lines


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def write_section(path: Path, marks: tuple[str, str], lines: list[str]) -> None:
    text = path.read_text()
    start, end = marks
    body = start + "\n" + "\n".join(lines) + "\n" + end
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="replace this script's sections in BENCHMARKS.md")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--cpu-n", type=int, default=2048)
    p.add_argument("--cpu-d", type=int, default=256)
    p.add_argument("--cpu-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--cpu-vocabs", type=lambda s: [int(x) for x in s.split(",")], default=[32768, 131072])
    p.add_argument("--cpu-naive-max-vocab", type=int, default=131072, help="skip the naive row above this vocab")
    p.add_argument("--cpu-chunks", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="extra rows: this commit with these fixed chunk sizes")
    p.add_argument("--cpu-repeats", type=int, default=2)
    p.add_argument("--baseline", help="git revision whose llmstack package runs the baseline rows in the same run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_cpu_child(json.loads(args.child))))
        return
    import torch

    sections = []
    if not args.gpu_only:
        print("CPU: linear + cross-entropy, chunked vs naive", file=sys.stderr)
        sections.append((CPU_MARK, run_cpu(args)))
    if not args.cpu_only:
        if torch.cuda.is_available():
            print("GPU benchmarks", file=sys.stderr)
            sections.append((GPU_MARK, run_gpu(args)))
        else:
            print("no CUDA device: GPU part skipped", file=sys.stderr)
    for _, lines in sections:
        print("\n".join(lines) + "\n")
    if args.write:
        for marks, lines in sections:
            write_section(ROOT / "BENCHMARKS.md", marks, lines)
        print(f"wrote {len(sections)} section(s) to BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
