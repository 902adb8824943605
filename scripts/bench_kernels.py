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

The GPU benchmarks are scripts/bench_gpu_kernels.py (run by scripts/bench_gpu.sh).

    python scripts/bench_kernels.py            # print the table(s)
    python scripts/bench_kernels.py --write    # also replace the sections in BENCHMARKS.md
    python scripts/bench_kernels.py --baseline cf2d641 --cpu-chunks 1024 --write   # before/after
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
