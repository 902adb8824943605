"""`llmstack plan` (per-rank memory and layout of a config) and `llmstack checkpoint consolidate SRC DST`."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from llmstack import checkpoint as ckpt
from llmstack import jsonio
from llmstack.config import CONFIGS_DIR, load_config
from llmstack.errors import UserError
from llmstack.parallel.consolidate import consolidate
from llmstack.parallel.plan import check_layout, format_gib, per_rank_estimate


def parse_mem(text: str) -> float:
    mt = re.fullmatch(r"\s*([\d.]+)\s*([GMT]i?B?)?\s*", text, re.I)
    if not mt:
        raise UserError(f"--gpu-mem: got {text!r}, expected e.g. 80GB")
    unit = (mt.group(2) or "GB").upper()[0]
    return float(mt.group(1)) * {"M": 2**20, "G": 2**30, "T": 2**40}[unit]


def plan_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmstack plan", description="Per-rank memory and layout checks for a config.")
    ap.add_argument("--config", default=None, help="run config YAML (default configs/tiny.yaml)")
    ap.add_argument("--gpus", type=int, default=None, help="world size (default tp x pp x (parallel.dp or 1))")
    ap.add_argument("--gpu-mem", default=None, help="memory per device, e.g. 80GB: says whether the layout fits")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    args = ap.parse_args(argv)
    cfg = load_config(args.config or CONFIGS_DIR / "tiny.yaml", args.overrides)
    p = cfg.parallel
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus: got {args.gpus}, must be >= 1")
    world = args.gpus or p.tp * p.pp * (p.dp or 1)
    dp = check_layout(cfg, world)
    est = per_rank_estimate(cfg, world)
    t = cfg.train
    print(f"layout: tp={p.tp} pp={p.pp} dp={dp} zero={p.zero_stage} on {world} ranks; precision {cfg.precision}")
    print(f"global batch: micro {t.micro_batch_size} x accum {t.grad_accum_steps} x dp {dp} = "
          f"{t.micro_batch_size * t.grad_accum_steps * dp} sequences of {cfg.data.seq_len} tokens")
    print(f"parameters per rank (heaviest stage): {est['params']:,.0f}")
    for key in ("weights", "grads", "optimizer", "activations", "activations_ckpt"):
        print(f"  {key:<18}{format_gib(est[key])}")
    print(f"  {'total':<18}{format_gib(est['total'])}   with activation checkpointing {format_gib(est['total_ckpt'])}")
    if args.gpu_mem:
        cap = parse_mem(args.gpu_mem)
        need = est["total_ckpt"] if t.activation_checkpointing else est["total"]
        verdict = "fits" if need <= 0.9 * cap else "does NOT fit"
        print(f"per device {format_gib(cap).strip()}: {verdict} ({need / cap:.0%} of it, 10% kept for fragmentation/buffers)")
    return 0


def checkpoint_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmstack checkpoint", description="Checkpoint tools.")
    sub = ap.add_subparsers(dest="action", required=True)
    c = sub.add_parser("consolidate", help="TP/PP/ZeRO checkpoint -> single-process checkpoint")
    c.add_argument("src", help="checkpoint folder or run folder (its latest checkpoint)")
    c.add_argument("dst", help="new output folder (refused if it exists and is not empty)")
    c.add_argument("--overwrite", action="store_true", help="replace an earlier output of consolidate at dst")
    args = ap.parse_args(argv)
    out = consolidate(Path(args.src), Path(args.dst), overwrite=args.overwrite)
    print(jsonio.dumps({"consolidated": str(out), "from": str(ckpt.resolve_checkpoint(Path(args.src)))}))
    return 0
