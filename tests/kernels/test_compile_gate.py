"""The GPU compile gate, on a machine without a GPU: every kernel through its public entry
(forward and backward), every config its autotuner may pick, compiled for sm_90 at the 8B-like
shape in bf16 and for sm_80 for attention and the gate-up matmul (the subset of
`make compile-check`; llmstack/kernels/compile_check.py says how). It fails on a compile error,
shared memory over the target's limit, and on sm_90 bf16 on a register spill or a tl.dot that
is not on wgmma; and when a launchable kernel in llmstack/kernels is reached by no case."""
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmstack.kernels.compile_cases import subset_jobs
from llmstack.kernels.compile_check import Job, run_jobs
from tests.kernels.conftest import GPU_MODE

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compile_gate_subset(tmp_path):
    if GPU_MODE:
        pytest.skip("the compile gate stands in for a GPU; on a GPU the kernel tests run for real")
    out = tmp_path / "records.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "scripts/compile_check.py", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    violations = [line for line in res.stderr.splitlines() if line.startswith(("VIOLATION", "UNCOVERED"))]
    assert res.returncode == 0, "\n".join(violations) or res.stderr[-3000:]
    records = json.loads(out.read_text())
    compiled = {(r["arch"], r["kernel"]) for r in records if not r["error"]}
    for kernel in ("attn_fwd", "bwd_dkdv", "bwd_dq", "_matmul_kernel"):
        assert (90, kernel) in compiled and (80, kernel) in compiled, kernel
    # the modes reached only through a backward or a decode shape
    for arch in (90, 80):   # gate-up backward: dx = [dgate dup] @ [Wg; Wu] as one SPLIT_B GEMM
        assert any(r["arch"] == arch and r["kernel"] == "_matmul_kernel" and "SPLIT_B=True" in r["config"]
                   for r in records), arch
    for kernel in ("_int8_gemv_kernel", "_int4_gemv_kernel", "_rms_bwd_kernel"):
        assert (90, kernel) in compiled, kernel
    # the fused add+norm with an fp32 residual stream (the model under autocast)
    assert any(r["kernel"].startswith("_rms") and r["dtype"] == "fp32" for r in records)
    # the sm_90 bf16 attention and gate-up dots are on wgmma in every pickable config
    dots = [r for r in records if r["arch"] == 90 and r["has_dot"] and r["dtype"] == "bf16" and not r["waived"]]
    assert dots and all(r["wgmma"] > 0 for r in dots)


def _slow_then(seconds, case):
    time.sleep(seconds)
    case()


@functools.lru_cache(maxsize=1)
def _catalog_with_a_crash():
    """A job that kills its worker the way a ptxas/LLVM crash does (SIGABRT, no Python
    exception), beside a real compile still in progress in the other worker."""
    rmsnorm = next(j for j in subset_jobs() if j.arch == 90 and j.name.startswith("rmsnorm"))
    jobs = [Job(90, "crash 8b abort", lambda: _slow_then(0.5, os.abort)),
            Job(90, "crash 8b after", lambda: None),
            Job(90, rmsnorm.name, lambda: _slow_then(3, rmsnorm.case))]
    return {(j.arch, j.name): j for j in jobs}


@pytest.mark.slow
def test_a_crashing_compile_is_reported_under_its_own_name(monkeypatch):
    if GPU_MODE:
        pytest.skip("compiles through the stand-in driver, as the gate does without a GPU")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    jobs = list(_catalog_with_a_crash().values())
    records = run_jobs(jobs, catalog=_catalog_with_a_crash, workers=2)
    failed = [(r.case, r.kernel) for r in records if r.error]
    assert failed == [("crash 8b abort", "?")], failed
    error = next(r.error for r in records if r.error)
    assert "compile worker died" in error and "compile_check.py --only crash --arch 90 --workers 0" in error, error
    # the compile the crash interrupted ran again, alone, and is not blamed
    assert any(r.kernel.startswith("_rms") and not r.error for r in records)
