"""End-to-end training step: llmstack vs Hugging Face transformers' LlamaForCausalLM.

Same Llama shapes, same token batches (from the default corpus), same AdamW settings, same
precision. Timing runs all variants in this one process, alternating round-robin over several
repeats so that machine noise hits every variant alike. Peak memory is measured per variant in a
fresh subprocess (peak RSS on CPU is process-wide and never goes down; max_memory_allocated on GPU).

  python scripts/bench_train.py --quick            # CPU: tiny + ~26M, under ~5 minutes
  python scripts/bench_train.py --sizes 125m 1b    # GPU, bf16
  python scripts/bench_train.py --precision bf16   # CPU under bf16 autocast (its own table)
  add --write to replace the table in BENCHMARKS.md

On CPU the MFU is against GEMM peaks measured in the same run (the best square fp32 and bf16
GEMM, both printed), for the precision of the rows; the table also says which bf16 instructions
the CPU has.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmstack.config import ModelConfig  # noqa: E402
from llmstack.kernels import resolve_ops  # noqa: E402
from llmstack.model import Llama  # noqa: E402
from llmstack.perf import cpu_bf16_flags, cpu_name, measure_gemm_flops, peak_flops  # noqa: E402

SIZES = {  # hidden, layers, heads, kv heads, vocab — the CPU sizes and GPU sizes
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=4096),
    "25m": dict(dim=512, n_layers=6, n_heads=8, n_kv_heads=8, vocab_size=8192),
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=8192),
}
VARIANTS = ["llmstack", "llmstack+compile", "hf-eager", "hf-sdpa", "hf-sdpa+compile"]


def model_config(size: str, seq_len: int) -> ModelConfig:
    return ModelConfig(name=size, max_seq_len=seq_len, multiple_of=32, **SIZES[size])


def build(variant: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """(model, step_fn) for a variant; step_fn(x, y) runs forward, backward and the optimizer."""
    torch.manual_seed(0)
    if variant.startswith("llmstack"):
        model = Llama(cfg, resolve_ops("auto", device.type)).to(device)

        def loss_fn(x, y):
            return model(x, y)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                             num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                             num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                             rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                             attn_implementation="eager" if "eager" in variant else "sdpa", use_cache=False)
        model = LlamaForCausalLM(hf_cfg).to(device)

        def loss_fn(x, y):
            return model(input_ids=x, labels=x, use_cache=False).loss
    if variant.endswith("+compile"):
        model.compile()
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)

    def step(x, y):
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return model, step


def batches(cfg: ModelConfig, batch: int, seq_len: int, n: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real token windows from the default corpus (bytes fall back to random ids if it is absent)."""
    from llmstack.config import Config, DataConfig
    from llmstack.data import build_corpus, open_split
    c = Config(model=cfg, data=DataConfig(seq_len=seq_len))
    try:
        tokens, _ = open_split(build_corpus(c), "train")
        g = torch.Generator().manual_seed(0)
        out = []
        for _ in range(n):
            starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=g)
            rows = torch.stack([torch.from_numpy(tokens[s: s + seq_len + 1].astype("int64")) for s in starts.tolist()])
            out.append((rows[:, :-1].to(device), rows[:, 1:].to(device)))
        return out
    except Exception as e:  # the benchmark should still run without the corpus
        print(f"(corpus unavailable: {e}; using random tokens)", file=sys.stderr)
        return [(torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device),) * 2 for _ in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variants(size, variants, device, dtype, batch, seq_len, repeats, steps, warmup):
    cfg = model_config(size, seq_len)
    data = batches(cfg, batch, seq_len, steps, device)
    built = {}
    for v in variants:
        model, step = build(v, cfg, device, dtype)
        for i in range(warmup):  # includes compilation for the compiled variants
            step(*data[i % len(data)])
        sync(device)
        built[v] = (model, step)
    times = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            _, step = built[v]
            for i in range(steps):
                sync(device)
                t0 = time.perf_counter()
                step(*data[i])
                sync(device)
                times[v].append(time.perf_counter() - t0)
    params = {v: sum(p.numel() for p in built[v][0].parameters()) for v in variants}
    flops = Llama(cfg).flops_per_token(seq_len) if device.type != "meta" else 0
    return times, params, flops


def peak_memory_subprocess(size, variant, device, dtype_name, batch, seq_len, steps=2) -> int:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv=['x']; import scripts.bench_train as b; "
            f"b.memory_probe({size!r}, {variant!r}, {device.type!r}, {dtype_name!r}, {batch}, {seq_len}, {steps})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        print(out.stderr[-2000:], file=sys.stderr)
        return -1


class LiveHeapSampler:
    """Peak of live malloc'd bytes (glibc mallinfo2: in-use arena + mmapped blocks), sampled from a
    thread while torch ops run with the GIL released. Unlike peak RSS it ignores freed-but-cached
    pages and library start-up, so it measures what the training step itself holds."""

    def __init__(self, interval_s: float = 2e-4):
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        self._info = libc.mallinfo2
        self.interval, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def live(self) -> int:
        m = self._info()
        return m.uordblks + m.hblkhd

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.live())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.live()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.live())


def memory_probe(size, variant, device_type, dtype_name, batch, seq_len, steps):
    """Printed: peak bytes held during building + training steps, beyond what was live before."""
    device = torch.device(device_type)
    dtype = getattr(torch, dtype_name)
    cfg = model_config(size, seq_len)
    data = batches(cfg, batch, seq_len, steps, device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _, step = build(variant, cfg, device, dtype)
        for x, y in data:
            step(x, y)
        sync(device)
        print(torch.cuda.max_memory_allocated() - base)
        return
    sampler = LiveHeapSampler()
    base = sampler.live()
    with sampler:
        _, step = build(variant, cfg, device, dtype)
        for x, y in data:
            step(x, y)
    print(sampler.peak - base)


def cpu_peaks(dtype: torch.dtype) -> tuple[dict, str]:
    """The MFU peak for `dtype` and a sentence with both GEMM peaks, measured now on this CPU."""
    cpu = torch.device("cpu")

    def best(dtype, sizes):  # the peak is the best square GEMM: torch's generic bf16 path peaks small
        return max((measure_gemm_flops(cpu, dtype, n, seconds=1.0), n) for n in sizes)

    (fp32, n32), (bf16, n16) = best(torch.float32, (256, 512, 1024)), best(torch.bfloat16, (64, 128, 256, 512))
    flags = cpu_bf16_flags()
    text = (f"GEMM peaks measured in this run (best square GEMM): fp32 {fp32 / 1e9:.1f} GFLOP/s (n={n32}), bf16 "
            f"{bf16 / 1e9:.1f} GFLOP/s (n={n16}), {bf16 / fp32:.2f}x fp32; bf16 instructions in /proc/cpuinfo: "
            + (", ".join(flags) if flags else "none (no amx_bf16, no avx512_bf16: torch's bf16 GEMM takes its generic path)"))
    if dtype == torch.float32:
        return {"peak": fp32, "source": "the fp32 GEMM peak measured in this run"}, text
    return {"peak": bf16, "source": "the bf16 GEMM peak measured in this run"}, text


def run(args) -> tuple[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sizes = args.sizes or (["tiny", "25m"] if device.type == "cpu" else ["125m", "1b"])
    peak, peaks_text = cpu_peaks(dtype) if device.type == "cpu" else (peak_flops(device), "")
    print(peaks_text, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {cpu_name()}, {torch.get_num_threads()} threads"
    lines = [f"Measured {datetime.date.today()} on {dev_name}; torch {torch.__version__}; commit {commit}; "
             f"{'bf16 autocast' if dtype != torch.float32 else 'fp32'}, AdamW (fused), batch {args.batch} x {args.seq_len} tokens; "
             f"timing alternates variants round-robin in one process ({args.repeats} repeats x {args.steps} steps); "
             f"peak memory = peak live heap growth (glibc mallinfo2, sampled) on CPU / max allocated on GPU, each variant in its own process. "
             f"MFU against {peak['source']} = {peak['peak'] / 1e9:.1f} GFLOP/s. {peaks_text}", "",
             f"Command: `python scripts/bench_train.py {' '.join(sys.argv[1:])}`", "",
             "| size | params | variant | tokens/s | step ms (median / min / max) | MFU | peak memory MB | tok/s vs best HF |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    tiny_ratio = float("nan")
    for size in sizes:
        variants = [v for v in VARIANTS if not (args.no_compile and "compile" in v)]
        times, params, flops = time_variants(size, variants, device, dtype, args.batch, args.seq_len, args.repeats,
                                             args.steps, args.warmup)
        tokens = args.batch * args.seq_len
        tps = {v: tokens / statistics.median(t) for v, t in times.items()}
        best_hf = max(tps[v] for v in variants if v.startswith("hf"))
        mem = {v: peak_memory_subprocess(size, v, device, str(dtype).split(".")[-1], args.batch, args.seq_len)
               for v in variants if not args.no_memory and "compile" not in v}
        best_hf_mem = min((m for v, m in mem.items() if v.startswith("hf") and m > 0), default=float("nan"))
        for v in variants:
            t = times[v]
            m = mem.get(v)
            mem_txt = "–" if m is None else f"{m / 2**20:.0f}" + (f" ({m / best_hf_mem:.2f}x HF)" if v.startswith("llmstack") else "")
            lines.append(f"| {size} | {params[v] / 1e6:.1f}M | {v} | {tps[v]:,.0f} | {1e3 * statistics.median(t):.1f} / "
                         f"{1e3 * min(t):.1f} / {1e3 * max(t):.1f} | {tps[v] * flops / peak['peak']:.1%} | {mem_txt} | "
                         f"{tps[v] / best_hf:.2f}x |")
        if size == "tiny":
            tiny_ratio = max(tps["llmstack"], tps.get("llmstack+compile", 0)) / best_hf
        print("\n".join(lines[-len(variants):]), flush=True)
    return "\n".join(lines), tiny_ratio


def write_section(marker: str, body: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start not in text:  # a new table goes after the fp32 one
        anchor = "<!-- /bench_train -->"
        k = text.index(anchor) + len(anchor)
        text = text[:k] + f"\n\n{start}\n{end}" + text[k:]
    i, j = text.index(start) + len(start), text.index(end)
    path.write_text(text[:i] + "\n" + body + "\n" + text[j:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU comparison in under ~5 minutes")
    p.add_argument("--sizes", nargs="*", choices=list(SIZES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="fp32, or bf16 autocast (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--write", action="store_true", help="replace the table in BENCHMARKS.md")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 3, 3
    table, ratio = run(args)
    print(table)
    if args.write:
        on_cpu = not torch.cuda.is_available()
        write_section("bench_train_bf16" if on_cpu and args.precision == "bf16" else "bench_train", table)
    print(f"llmstack/transformers tokens/s ratio: {ratio:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
