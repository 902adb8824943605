#!/usr/bin/env python
"""Kernel benchmarks.

CPU part (always runs): peak memory and time of the chunked linear + cross-entropy
(`linear_cross_entropy_torch`) against the naive version that materialises the [N, V] logits,
forward + backward, fp32. Every variant runs in its own fresh subprocess, so one run's allocations
cannot hide inside another's: the child builds its inputs, reads its current RSS
(/proc/self/statm), runs one forward + backward, then reads `ru_maxrss` (the kernel's record of the
process's peak resident set). Peak growth = ru_maxrss after - RSS before: everything the step
allocated at its high point (logits, softmax buffers, grad_h, grad_W). torch's CPU allocator hands
big blocks straight to/from the OS (mmap), so RSS follows live tensors. The time is the median of
further runs in the same child.

The GPU benchmarks are scripts/bench_gpu_kernels.py (run by scripts/bench_gpu.sh).

    python scripts/bench_kernels.py            # print the table(s)
    python scripts/bench_kernels.py --write    # also replace the sections in BENCHMARKS.md
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
# CPU: chunked vs naive linear + CE, one subprocess per variant
# ---------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_child(spec: dict) -> dict:
    import torch
    from llmstack.kernels.cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_torch

    torch.manual_seed(0)
    N, D, V = spec["n"], spec["d"], spec["v"]
    fn = linear_cross_entropy_reference if spec["variant"] == "naive" else linear_cross_entropy_torch
    kw = dict(reduction="mean", chunk_size=spec["chunk"])
    h = (torch.randn(N, D) / D ** 0.5).requires_grad_(True)
    w = (torch.randn(V, D) / D ** 0.5).requires_grad_(True)
    t = torch.randint(0, V, (N,))

    def step():
        h.grad = None
        w.grad = None
        loss = fn(h, w, t, **kw)
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
            "threads": torch.get_num_threads()}


def run_cpu(args) -> list[str]:
    variants = [("naive", 0)] + [("chunked", c) for c in args.cpu_chunks]
    rows = []
    threads = None
    for V in args.cpu_vocabs:
        naive = None
        for name, chunk in variants:
            spec = {"variant": name, "n": args.cpu_n, "d": args.cpu_d, "v": V, "chunk": chunk or args.cpu_n,
                    "repeats": args.cpu_repeats}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, cwd=ROOT)
            if proc.returncode != 0:
                rows.append([V, name, chunk or "-", "failed", proc.stderr.strip().splitlines()[-1:], "", ""])
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            threads = res["threads"]
            if name == "naive":
                naive = res
            label = "naive (logits materialised)" if name == "naive" else "chunked `linear_cross_entropy_torch`"
            mem_ratio = f"{naive['peak_growth'] / res['peak_growth']:.1f}x less" if naive and name != "naive" else "-"
            rows.append([f"{V:,}", label, chunk or "-", f"{res['peak_growth'] / MiB:,.0f}", mem_ratio,
                         f"{res['time']:.2f}", f"{res['loss']:.4f}"])
            print(f"  V={V} {name} chunk={chunk}: peak +{res['peak_growth'] / MiB:.0f} MiB, {res['time']:.2f} s",
                  file=sys.stderr)
    N, D = args.cpu_n, args.cpu_d
    lines = _header(f"CPU, {cpu_name()}, {threads} torch threads (other jobs may share the cores)",
                    _command())
    lines += ["",
              f"Fused linear + cross-entropy, forward + backward, fp32, N={N:,} tokens, D={D}, reduction=mean. "
              f"Peak memory = growth of the process's peak RSS during one fwd+bwd (fresh subprocess per row; "
              f"inputs excluded, grad_h/grad_W included). Time = median of {args.cpu_repeats} further runs. "
              f"For scale: one fp32 [N, V] logits tensor is {N * 4 / MiB:.3f} MiB per vocab entry "
              f"(N x V x 4 B).",
              ""]
    lines += _table(["V", "variant", "chunk", "peak MiB", "vs naive", "fwd+bwd s", "loss"], rows)
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
    p.add_argument("--cpu-n", type=int, default=8192)
    p.add_argument("--cpu-d", type=int, default=256)
    p.add_argument("--cpu-vocabs", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768])
    p.add_argument("--cpu-chunks", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096])
    p.add_argument("--cpu-repeats", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_cpu_child(json.loads(args.child))))
        return
    print("CPU: linear + cross-entropy, chunked vs naive", file=sys.stderr)
    sections = [(CPU_MARK, run_cpu(args))]
    for _, lines in sections:
        print("\n".join(lines) + "\n")
    if args.write:
        for marks, lines in sections:
            write_section(ROOT / "BENCHMARKS.md", marks, lines)
        print(f"wrote {len(sections)} section(s) to BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
