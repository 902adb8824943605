#!/usr/bin/env python
"""GPU compile gate on a machine without a GPU: compile every kernel through its public entry for
sm_90 / sm_80 on fake CUDA tensors (see llmstack/kernels/compile_check.py), print the resource
table (registers, spills, shared memory, wgmma / mma.sync use) and exit 1 on any violation:
a compile error, shared memory over the target's limit, or on sm_90 with bf16/fp16 operands a
spill or a tl.dot without wgmma.

    python scripts/compile_check.py                  # the subset `make test` runs (~100 compiles)
    python scripts/compile_check.py --full --write   # every shape/dtype/option (make compile-check);
                                                     # writes the table into BENCHMARKS.md
    python scripts/compile_check.py --only attention --arch 90   # one family, one target
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["TRITON_INTERPRET"] = "0"   # before triton is imported: the gate compiles for real GPUs

from llmstack.kernels.compile_cases import full_jobs, jobs_by_name, subset_jobs, uncovered  # noqa: E402
from llmstack.kernels.compile_check import SMEM_LIMIT, Record, run_jobs  # noqa: E402
from scripts.bench_kernels import _git_commit, write_section  # noqa: E402

MARKS = ("<!-- compile_check -->", "<!-- /compile_check -->")


def _fmt_row(r: Record) -> list[str]:
    bad = r.violations()
    spills = f"{r.spill_stores}/{r.spill_loads}" if (r.spill_stores or r.spill_loads) else "0"
    tc = f"{r.wgmma} wgmma" if r.wgmma else (f"{r.mma} mma.sync" if r.mma else ("-" if not r.has_dot else "none"))
    status = "; ".join(bad) if bad else (f"ok (waived, {r.waived})" if r.waived else "ok")
    if r.error:
        return [f"sm_{r.arch}", r.kernel, "", "", "", "", "", "", "", status, r.case]
    return [f"sm_{r.arch}", r.kernel, r.dtype, r.config, f"w{r.num_warps} s{r.num_stages}", str(r.regs), spills,
            f"{r.smem:,}", tc, status, r.case]


def _table(cols, rows) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return out + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]


def summary(records: list[Record]) -> list[str]:
    """Per target and kernel: specialisations, how many spill / exceed smem / miss wgmma."""
    groups = defaultdict(list)
    for r in records:
        groups[(r.arch, r.kernel)].append(r)
    rows = []
    for (arch, kernel), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        ok = [r for r in rs if not r.error]
        low = [r for r in ok if r.dtype in ("bf16", "fp16")]
        rows.append([f"sm_{arch}", kernel, str(len(ok)), str(sum(1 for r in rs if r.error)),
                     str(sum(1 for r in ok if r.spill_stores or r.spill_loads)),
                     str(sum(1 for r in low if r.spill_stores or r.spill_loads)),
                     str(max((r.spill_stores for r in ok), default=0)),
                     str(sum(1 for r in ok if r.smem > SMEM_LIMIT[arch])),
                     str(max((r.smem for r in ok), default=0)),
                     f"{sum(1 for r in low if r.has_dot and r.wgmma)}/{sum(1 for r in low if r.has_dot)}",
                     str(sum(1 for r in rs if r.waived)), str(sum(1 for r in rs if r.violations()))])
    return _table(["target", "kernel", "compiled", "errors", "spilling (all)", "spilling bf16/fp16",
                   "max spill B", "over smem", "max smem B", "wgmma (bf16/fp16 dots)", "waived", "gate violations"], rows)


def report(records: list[Record], *, command: str, seconds: float, jobs: int) -> list[str]:
    import torch
    import triton
    bad = [r for r in records if r.violations()]
    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
             f"git commit {_git_commit()}, torch {torch.__version__}, triton {triton.__version__} "
             f"(its bundled ptxas), python {platform.python_version()}; CPU only, no GPU used",
             f"- command: `{command}` — {jobs} cases, {len(records)} specialisations, {seconds / 60:.1f} min",
             f"- result: {'PASS' if not bad else f'FAIL ({len(bad)} violations)'}. Rule: no compile error; "
             "shared memory within the target's limit (sm_90 232,448 B, sm_80 166,912 B); on sm_90 with bf16/fp16 "
             "operands no register spill and every tl.dot on wgmma; the rows a waiver exempts say which and why.",
             "- spills = ptxas `-v` spill stores/loads in bytes per thread; smem = `metadata.shared`; "
             "tensor cores = wgmma.mma_async / mma.sync instructions in the PTX (`-` = no tl.dot).",
             ""]
    lines += summary(records)
    lines += ["", "<details><summary>every specialisation</summary>", ""]
    lines += _table(["target", "kernel", "dtype", "config", "warps/stages", "regs", "spills st/ld B", "smem B",
                     "tensor cores", "status", "cases"], [_fmt_row(r) for r in records])
    lines += ["", "</details>"]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every shape/dtype/option (default: the make-test subset)")
    p.add_argument("--only", nargs="*", default=None, help="kernel families to keep (attention, gate_up, ...)")
    p.add_argument("--arch", type=int, nargs="*", default=None, choices=sorted(SMEM_LIMIT), help="targets to keep")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes; 0 = compile in this process (a compiler crash then shows its own output)")
    p.add_argument("--json", type=Path, help="also write the records as JSON here")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    jobs = full_jobs() if args.full else subset_jobs()
    if args.only:
        jobs = [j for j in jobs if j.name.split(" ")[0] in args.only]
    if args.arch:
        jobs = [j for j in jobs if j.arch in args.arch]
    if not jobs:
        p.error("no case left after --only/--arch")
    t0 = time.time()
    records = run_jobs(jobs, catalog=jobs_by_name, workers=args.workers, progress=lambda m: print(m, file=sys.stderr, flush=True))
    seconds = time.time() - t0
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--json" in shown:   # where this run kept its records is not part of the command to reproduce it
        i = shown.index("--json")
        del shown[i:i + 2]
    command = "python scripts/compile_check.py " + " ".join(shown)
    lines = report(records, command=command.strip(), seconds=seconds, jobs=len(jobs))
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in records], indent=1))
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", MARKS, lines)
        print("wrote the compile_check section of BENCHMARKS.md", file=sys.stderr)
    bad = [r for r in records if r.violations()]
    missing = [] if (args.only or args.arch) else uncovered(records)
    for name in missing:
        print(f"UNCOVERED kernel {name}: no compile-gate case reaches it (add one to "
              "llmstack/kernels/compile_cases.py)", file=sys.stderr)
    for r in bad:
        print(f"VIOLATION sm_{r.arch} {r.kernel} {r.dtype} {r.config} w{r.num_warps} s{r.num_stages} "
              f"[{r.case}]: {'; '.join(r.violations())}", file=sys.stderr)
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
