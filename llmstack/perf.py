"""Peak FLOP/s of the device, for model FLOPs utilization (MFU).

CPU: the measured fp32 GEMM FLOP/s of this machine (measured once, cached per CPU model and thread
count under ~/.cache/llmstack). GPU: the datasheet dense bf16 peak, with the measured cuBLAS bf16
GEMM FLOP/s beside it.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

# dense (no sparsity) bf16 tensor-core peaks from NVIDIA datasheets
GPU_BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                 "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12}
CACHE = Path(os.environ.get("LLMSTACK_CACHE", Path.home() / ".cache" / "llmstack")) / "peak_flops.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags() -> list[str]:
    """The bf16 matrix/dot instruction sets /proc/cpuinfo lists for this CPU (x86: AMX-BF16,
    AVX512-BF16); empty where there are none (torch's bf16 GEMM then takes a slow generic path)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in BF16_CPU_FLAGS if f in flags]


def measure_gemm_flops(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} x{torch.get_num_threads()} threads"


def peak_flops(device: torch.device) -> dict:
    """{'peak': FLOP/s used for MFU, 'source': how it was obtained, 'measured': GEMM FLOP/s}."""
    key = device_key(device)
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if key in cache:
        return cache[key]
    if device.type == "cuda":
        measured = measure_gemm_flops(device, torch.bfloat16, 8192)
        name = next((k for k in GPU_BF16_PEAK if k in key), None)
        entry = {"peak": GPU_BF16_PEAK[name] if name else measured, "measured": measured,
                 "source": f"datasheet bf16 ({name})" if name else "measured cuBLAS bf16 (no datasheet entry)"}
    else:
        measured = measure_gemm_flops(device, torch.float32, 1024)
        entry = {"peak": measured, "measured": measured, "source": "measured fp32 GEMM 1024^3"}
    cache[key] = entry
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass
    return entry
