"""GPU compile gate that needs no GPU: drive the real kernel launchers on fake CUDA tensors and
compile (never launch) every kernel and every autotune config they can reach, for a chosen
NVIDIA target, then read each compiled kernel's resources.

How it works (Triton >= 3.5 API, checked against triton 3.9):

- tensors are torch `FakeTensorMode` tensors on device "cuda": shapes, strides and dtypes are real,
  no memory exists, so the launchers' torch glue (empty, views, mm) runs unchanged;
- Triton's active driver is replaced by `_StandInDriver`, whose target is `GPUTarget("cuda", arch,
  32)`: `JITFunction.run` specialises and compiles exactly as it would on that GPU, the autotuner
  benchmarks every config its `prune_configs_by` keeps (the stand-in benchmarker calls the kernel
  once: compile, then a no-op launch) and picks one;
- autograd does not run on fake CUDA tensors in a CPU build of torch, so `Function.apply` is
  replaced for the duration by a direct call of the Function's forward and then its backward
  (with fake output gradients): the public entry points are called as the model calls them;
- `knobs.compilation.always_compile` makes every specialisation go through ptxas (no cache hit),
  `knobs.nvidia.dump_ptxas_log` prints ptxas' `-v` log (registers, spill stores/loads), which is
  captured from stdout; `knobs.compilation.listener` gets each finished compile: the kernel, its
  constexprs, `metadata["shared"]` (bytes of shared memory) and the PTX/TTIR files, from which
  wgmma / mma.sync use and the presence of a tl.dot are read.

`run_jobs` runs a list of `Job`s (target arch + a case: a callable that calls a public kernel
entry) in worker processes and returns one `Record` per compiled specialisation plus one per
failure. `Record.violations()` is the gate's rule (see `violations`). The cases live in
`llmstack.kernels.compile_cases`; `scripts/compile_check.py` is the command line.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import traceback
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

from llmstack.kernels import triton_interpreting

# Shared memory per block (opt-in maximum) and SM count, from NVIDIA's tuning guides.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
GPU_NAME = {80: "NVIDIA A100-SXM4-80GB", 86: "NVIDIA A10", 89: "NVIDIA L40S", 90: "NVIDIA H100 80GB HBM3"}
LOW_PRECISION = ("bf16", "fp16")


@dataclass
class Record:
    """One compiled specialisation (or one failure) of one kernel for one target."""
    arch: int
    kernel: str
    case: str
    dtype: str = ""             # element type of the kernel's first pointer argument ("bf16", "fp32", ...)
    config: str = ""            # constexpr meta-parameters (BLOCK_*, flags), "k=v" joined by spaces
    num_warps: int = 0
    num_stages: int = 0
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    has_dot: bool = False       # the TTIR holds a tt.dot
    wgmma: int = 0              # wgmma.mma_async instructions in the PTX
    mma: int = 0                # mma.sync instructions in the PTX
    error: str = ""
    waived: str = ""            # "rule: reason; ..." of the Waivers that matched (shown in the table)

    def violations(self) -> list[str]:
        return violations(self)

    def key(self) -> tuple:
        return (self.arch, self.kernel, self.dtype, self.config, self.num_warps, self.num_stages)


def violations(r: Record) -> list[str]:
    """The gate: a compile error anywhere; shared memory over the target's limit anywhere; on
    sm_90 with bf16/fp16 operands, register spills, or a tl.dot that compiled to no wgmma."""
    out = []
    if r.error:
        return [f"compile error: {r.error}"]
    limit = SMEM_LIMIT.get(r.arch)
    if limit is not None and r.smem > limit:
        out.append(f"shared memory {r.smem} B > sm_{r.arch} limit {limit} B")
    if r.arch >= 90 and r.dtype in LOW_PRECISION:
        if (r.spill_stores or r.spill_loads) and "spills:" not in r.waived:
            out.append(f"spills {r.spill_stores} B stores / {r.spill_loads} B loads")
        if r.has_dot and not r.wgmma and "wgmma:" not in r.waived:
            out.append("tl.dot without wgmma")
    return out


@dataclass(frozen=True)
class Waiver:
    """A gate rule ("spills" or "wgmma") that does not apply to some specialisations, and why;
    the reason is printed in the table row. kernel "" = any kernel; config = a substring of
    Record.config. Compile errors and shared memory are never waived."""
    rule: str
    reason: str
    kernel: str = ""
    config: str = ""

    def matches(self, r: Record) -> bool:
        return (not self.kernel or r.kernel == self.kernel) and self.config in r.config


@dataclass
class Job:
    """`case()` calls a public kernel entry on fake tensors made by `fake()` (see below)."""
    arch: int
    name: str
    case: Callable[[], None] = field(repr=False)
    waivers: tuple[Waiver, ...] = ()


# ---------------------------------------------------------------------------------------------
# fake tensors and fake autograd
# ---------------------------------------------------------------------------------------------

def fake(*shape: int, dtype: torch.dtype = torch.bfloat16, grad: bool = False) -> torch.Tensor:
    """An uninitialised tensor on "cuda" (a FakeTensor while a job runs)."""
    t = torch.empty(shape, dtype=dtype, device="cuda")
    return t.requires_grad_(True) if grad else t


class _Ctx:
    """Enough of autograd's ctx for our Functions: saved tensors, needs_input_grad, attributes."""

    def __init__(self, args):
        self.needs_input_grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *args):
        pass

    def mark_dirty(self, *args):
        pass

    def set_materialize_grads(self, value):
        pass


def _forward_then_backward(cls, *args):
    """Function.apply on fake tensors: forward, then backward with fake output gradients."""
    ctx = _Ctx(args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        if cls.setup_context is not torch.autograd.Function.setup_context:
            out = cls.forward(*detached)
            cls.setup_context(ctx, tuple(detached), out)
        else:
            out = cls.forward(ctx, *detached)
        if any(ctx.needs_input_grad):
            outs = out if isinstance(out, tuple) else (out,)
            grads = [torch.empty_like(o) if isinstance(o, torch.Tensor) and o.is_floating_point() else None
                     for o in outs]
            cls.backward(ctx, *grads)
    return out


def _basic_index(t: torch.Tensor, idx):
    """t[idx] for ints / slices / None / Ellipsis as select / slice / unsqueeze ops. Python
    indexing of a CUDA tensor takes a CUDA device guard, which a CPU build of torch cannot
    make even for a fake tensor; the ops themselves dispatch to FakeTensorMode fine."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, bool) or not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in idx):
        return None
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:at] + (slice(None),) * (t.dim() - used) + idx[at + 1:]
    out, dim = t, 0
    for i in idx:
        if i is None:
            out = out.unsqueeze(dim)
            dim += 1
        elif isinstance(i, int):
            out = out.select(dim, i)
        else:
            start, stop, step = i.indices(out.shape[dim])
            out = torch.ops.aten.slice(out, dim, start, max(start, stop), step)
            dim += 1
    return out


_GETITEM, _SETITEM = torch.Tensor.__getitem__, torch.Tensor.__setitem__


def _getitem(self, idx):
    out = _basic_index(self, idx)
    return _GETITEM(self, idx) if out is None else out


def _setitem(self, idx, value):
    view = _basic_index(self, idx)
    if view is None:
        return _SETITEM(self, idx, value)
    torch.ops.aten.copy_(view, value if isinstance(value, torch.Tensor) else torch.tensor(value))


def _copy_(self, src, non_blocking=False):
    # the Tensor.copy_ method takes a CUDA device guard when it converts dtypes (as in the loss
    # driver's fp32 grad_W slabs); the aten op itself dispatches to FakeTensorMode
    return torch.ops.aten.copy_(self, src, non_blocking)


# ---------------------------------------------------------------------------------------------
# stand-in Triton driver
# ---------------------------------------------------------------------------------------------

def _triton_pieces():
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver
    if not hasattr(knobs, "compilation") or not hasattr(knobs.compilation, "listener"):
        raise RuntimeError(f"compile_check needs triton's knobs.compilation.listener (triton >= 3.5); "
                           f"this is triton {triton.__version__}")
    return triton, knobs, GPUTarget, DriverBase, driver


def _make_driver(arch: int):
    _, _, GPUTarget, DriverBase, _ = _triton_pieces()

    class _Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": SMEM_LIMIT[arch], "multiprocessor_count": SM_COUNT[arch],
                    "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1_755_000, "mem_clock_rate": 2_619_000,
                    "mem_bus_width": 5120}

        def load_binary(self, name, kernel, shared, device):
            return 0, 0, 0, 0, 1024   # module, function, n_regs, n_spills, max threads per block

        def unload_module(self, module):
            pass

    class _NoLaunch:
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args, **kwargs):
            pass

    class _StandInDriver(DriverBase):
        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)
            self.utils = _Utils()
            self.launcher_cls = _NoLaunch

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_device_interface(self):
            return torch.cuda

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=0):
            return divmod(arch, 10)

        def get_benchmarker(self):
            return _benchmark

        def get_empty_cache_for_benchmark(self):
            return None

        def clear_cache(self, cache):
            pass

    return _StandInDriver()


class _State:
    """Per-worker capture state: the ptxas log since the last compile, the records so far."""

    def __init__(self):
        self.log = io.StringIO()
        self.records: list[Record] = []
        self.job: Job | None = None
        self.arch: int | None = None
        self.seen: set = set()
        self.running_file = ""   # names the job in progress, for the parent when this worker dies


_STATE = _State()


def _benchmark(kernel_call, quantiles=None, **kwargs):
    """The autotuner's benchmarker: run the config once (compile + no-op launch). A failing
    config is recorded (triton itself would silently drop it) and reported as infinitely slow."""
    try:
        kernel_call()
    except Exception as e:  # noqa: BLE001 - every failure of a pickable config is a gate failure
        _record_failure(e)
        return [float("inf")] * (len(quantiles) if quantiles else 1)
    return [1.0] * (len(quantiles) if quantiles else 1)


_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _dtype_of(signature: dict) -> str:
    for ty in signature.values():
        if isinstance(ty, str) and ty.startswith("*"):
            return ty[1:]
    return ""


def _config_of(src) -> str:
    names = src.fn.arg_names
    parts = []
    for path, value in sorted(src.constants.items()):
        idx = path[0] if isinstance(path, tuple) else path
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
        if src.signature.get(name) == "constexpr":
            parts.append(f"{name}={value}")
    return " ".join(parts)


def _read(path: str | None) -> str:
    if not path:
        return ""
    with open(path, errors="replace") as f:
        return f.read()


def _waives(w: Waiver, r: Record) -> bool:
    """The waiver matches and the rule it names would otherwise fail this record."""
    if not w.matches(r) or r.arch < 90 or r.dtype not in LOW_PRECISION:
        return False
    return bool(r.spill_stores or r.spill_loads) if w.rule == "spills" else r.has_dot and not r.wgmma


def _listener(*, src, metadata, metadata_group, times=None, cache_hit=False):
    log = _STATE.log.getvalue()
    _STATE.log.seek(0)
    _STATE.log.truncate()
    name = src.fn.__name__ if hasattr(src, "fn") else metadata.get("name", "?")
    files = {os.path.splitext(k)[1]: v for k, v in metadata_group.items()}
    ptx = _read(files.get(".ptx"))
    ttir = _read(files.get(".ttir"))
    spills = _SPILL.findall(log)
    regs = _REGS.findall(log)
    job = _STATE.job
    rec = Record(
        arch=_STATE.arch, kernel=name, case=job.name if job else "", dtype=_dtype_of(src.signature),
        config=_config_of(src), num_warps=metadata["num_warps"], num_stages=metadata["num_stages"],
        regs=int(regs[-1]) if regs else 0,
        spill_stores=int(spills[-1][0]) if spills else 0, spill_loads=int(spills[-1][1]) if spills else 0,
        smem=int(metadata.get("shared", 0) or 0), has_dot="tt.dot" in ttir,
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)))
    rec.waived = "; ".join(f"{w.rule}: {w.reason}" for w in (job.waivers if job else ()) if _waives(w, rec))
    if cache_hit or not log:
        rec.error = "no ptxas log captured (cache hit?)"
    _STATE.records.append(rec)


def _record_failure(e: BaseException):
    _STATE.log.seek(0)
    _STATE.log.truncate()   # a failed compile's partial log must not be read as the next one's
    job = _STATE.job
    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    kernel, config, warps, stages = _failing_kernel(e)
    _STATE.records.append(Record(arch=_STATE.arch, kernel=kernel, case=job.name if job else "", config=config,
                                 num_warps=warps, num_stages=stages, error=msg))


def _failing_kernel(e: BaseException) -> tuple[str, str, int, int]:
    """(kernel, meta-parameters, warps, stages) of the JITFunction.run the error came through,
    else the innermost llmstack.kernels frame."""
    from triton.runtime.jit import JITFunction
    where = "?"
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        self = frame.f_locals.get("self")
        if frame.f_code.co_name == "run" and isinstance(self, JITFunction):
            kw = frame.f_locals.get("kwargs") or {}
            config = " ".join(f"{k}={v}" for k, v in kw.items() if k[:1].isupper())
            return self.fn.__name__, config, int(kw.get("num_warps") or 0), int(kw.get("num_stages") or 0)
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "llmstack/kernels/" in path and not path.endswith("compile_check.py"):
            where = f"{os.path.basename(path)}:{lineno}"
    return where, "", 0, 0


def _all_triton_functions():
    """(autotuners, jit functions) defined in llmstack.kernels modules."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    tuners, jits = [], []
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("llmstack.kernels") or mod is None:
            continue
        for obj in vars(mod).values():
            fn = obj
            while fn is not None and not isinstance(fn, JITFunction):
                if isinstance(fn, Autotuner):
                    tuners.append(fn)
                fn = getattr(fn, "fn", None)
            if isinstance(fn, JITFunction):
                jits.append(fn)
    return tuners, jits


def _set_target(arch: int):
    _, knobs, _, _, driver = _triton_pieces()
    if _STATE.arch == arch:
        return
    driver.set_active(_make_driver(arch))
    from triton.compiler import compiler
    compiler.max_shared_mem.cache_clear()   # lru-cached per device: it would keep the last target's limit
    _, jits = _all_triton_functions()
    for fn in jits:
        fn.device_caches.clear()   # binders hold the previous target
    _STATE.arch = arch


@contextlib.contextmanager
def _fake_cuda(arch: int):
    """torch.cuda queries the launchers make, answered for `arch`; autograd replaced; basic
    indexing routed through ops (see _basic_index)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    major, minor = divmod(arch, 10)
    props = types.SimpleNamespace(multi_processor_count=SM_COUNT[arch], name=GPU_NAME[arch], major=major,
                                  minor=minor, total_memory=80 * 2**30)
    with contextlib.ExitStack() as stack:
        for name, value in (("get_device_properties", lambda *a, **k: props),
                            ("get_device_capability", lambda *a, **k: (major, minor)),
                            ("get_device_name", lambda *a, **k: GPU_NAME[arch]),
                            ("current_device", lambda: 0),
                            ("is_available", lambda: True)):
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        stack.enter_context(mock.patch.object(torch.autograd.Function, "apply",
                                              classmethod(_forward_then_backward)))
        stack.enter_context(mock.patch.object(torch.Tensor, "__getitem__", _getitem))
        stack.enter_context(mock.patch.object(torch.Tensor, "__setitem__", _setitem))
        stack.enter_context(mock.patch.object(torch.Tensor, "copy_", _copy_))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        yield


def _worker_init(cache_dir: str):
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # 3.9 warns when unset; 1 = the default GPUs run
    _, knobs, _, _, _ = _triton_pieces()
    if triton_interpreting():
        raise RuntimeError("compile_check: TRITON_INTERPRET=1 in this process; the gate compiles for real GPUs")
    knobs.cache.dir = cache_dir
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.listener = _listener
    _STATE.running_file = os.path.join(cache_dir, f"running-{os.getpid()}")
    import warnings
    warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")


def _run_bundle(bundle: list[tuple[int, str]], by_name: dict | Callable[[], dict]) -> list[dict]:
    """Worker entry: run the named jobs (arch, case name) and return their records. `by_name` is
    the job table, or (in a spawned worker) the module-level function that builds it: jobs hold
    fake tensors and closures, which do not pickle, a function does (by reference)."""
    if callable(by_name):
        by_name = by_name()
    _STATE.records = []
    for arch, name in bundle:
        job = by_name[(arch, name)]
        _set_target(arch)
        tuners, _ = _all_triton_functions()
        for t in tuners:
            t.cache.clear()   # every job re-runs its autotuning, so every pickable config is seen
        _STATE.job = job
        with open(_STATE.running_file, "w") as f:
            f.write(f"{arch} {name}")
        try:
            with contextlib.redirect_stdout(_STATE.log), _fake_cuda(arch):
                job.case()
        except Exception as e:  # noqa: BLE001 - recorded, the gate reports it
            _record_failure(e)
        finally:
            _STATE.job = None
    os.remove(_STATE.running_file)
    return [asdict(r) for r in _STATE.records]


def run_jobs(jobs: list[Job], *, catalog: Callable[[], dict], workers: int = 2,
             progress: Callable[[str], None] | None = None) -> list[Record]:
    """Compile everything the jobs reach. Jobs of one (arch, family, shape) run in one worker so
    the specialisations they share compile once; the bundles are spread over `workers` processes
    (spawned: there the jobs are looked up by name in `catalog()`, a module-level function such
    as compile_cases.jobs_by_name). workers=0: in this process, any jobs."""
    if workers == 0:   # in this process (debugging; TRITON_INTERPRET must be 0 before triton was imported)
        cache_dir = tempfile.mkdtemp(prefix="llmstack-compile-check-")
        try:
            _worker_init(cache_dir)
            by_name = {(j.arch, j.name): j for j in jobs}
            return dedup([Record(**d) for d in _run_bundle([(j.arch, j.name) for j in jobs], by_name)])
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
    bundles: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for j in jobs:
        bundles.setdefault((j.arch, *j.name.split(" ")[:2]), []).append((j.arch, j.name))
    pending = sorted(bundles.values(), key=len, reverse=True)
    cache_dir = tempfile.mkdtemp(prefix="llmstack-compile-check-")
    env_before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"   # spawned workers inherit it before importing triton
    records: list[Record] = []
    try:
        while pending:
            pending = _run_pool(pending, catalog, workers, cache_dir, records, progress)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        if env_before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env_before
    return dedup(records)


def _run_pool(bundles, catalog, workers, cache_dir, records, progress) -> list[list[tuple[int, str]]]:
    """Run the bundles in one pool; returns [] or, when a worker died (a crash inside ptxas or
    LLVM kills the process, not a Python error), the bundles still to run. The jobs that were in
    progress then are each run again alone, so only the one that crashes by itself is recorded
    as the failure, under its own name."""
    ctx = multiprocessing.get_context("spawn")
    finished = set()
    try:
        with cf.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, initializer=_worker_init,
                                    initargs=(cache_dir,)) as pool:
            futures = {pool.submit(_run_bundle, b, catalog): i for i, b in enumerate(bundles)}
            for fut in cf.as_completed(futures):
                got = [Record(**d) for d in fut.result()]
                records.extend(got)
                finished.add(futures[fut])
                if progress:
                    b = bundles[futures[fut]]
                    bad = sum(1 for r in got if r.violations())
                    progress(f"sm_{b[0][0]} {' '.join(b[0][1].split(' ')[:2])}: {len(b)} case(s), {len(got)} compile(s), "
                             f"{bad} violation(s)")
        return []
    except cf.process.BrokenProcessPool:
        suspects = []
        for marker in Path(cache_dir).glob("running-*"):
            arch, name = marker.read_text().split(" ", 1)
            suspects.append((int(arch), name))
            marker.unlink()
        if not suspects:
            raise
    for job in suspects:
        if len(bundles) > 1 or workers > 1:
            _run_pool([[job]], catalog, 1, cache_dir, records, progress)
        else:
            records.append(Record(arch=job[0], kernel="?", case=job[1],
                                  error="the compile worker died (a crash in ptxas/LLVM?); to see its output: python "
                                        f"scripts/compile_check.py --only {job[1].split(' ')[0]} --arch {job[0]} --workers 0"))
    return [[j for j in b if j not in suspects] for i, b in enumerate(bundles) if i not in finished and
            any(j not in suspects for j in b)]


def dedup(records: list[Record]) -> list[Record]:
    """One row per specialisation (several cases may reach the same one); failures all kept."""
    seen: dict[tuple, Record] = {}
    out = []
    for r in records:
        if r.error:
            out.append(r)
            continue
        k = r.key()
        if k in seen:
            if r.case not in seen[k].case.split(", "):
                seen[k].case += f", {r.case}"
            continue
        seen[k] = r
        out.append(r)
    return sorted(out, key=lambda r: (-r.arch, r.kernel, r.dtype, r.config, r.num_warps, r.num_stages))
