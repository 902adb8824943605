"""`llmstack prune --checkpoint SRC --method magnitude|wanda|sparsegpt --sparsity 0.5 [--pattern 2:4]
--calib-batches N --out DST`: argument parsing and validation; `prune/pruner.py` does the work.

Every option is checked before the checkpoint is loaded (the N:M pattern against the layer
widths right after, before any pruning): a bad value is one line naming the option (exit 2), an
existing destination is refused, and nothing is written or overwritten.
"""
from __future__ import annotations

import argparse

import torch

from llmstack import jsonio
from llmstack.calibration import calibration_batches
from llmstack.outputs import check_destination
from llmstack.pretrained import load_pretrained
from llmstack.prune.pruner import (METHODS, PruneError, check_options, check_pattern_fits, prune_model,
                                   prune_targets, save_pruned)


def _number(text: str | None, flag: str, kind: type):
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        raise PruneError(f"{flag}: got {text!r}, expected {'an integer' if kind is int else 'a number'}") from None


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PruneError(f"--device: got {name!r}, expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PruneError(f"--device {name}: no CUDA device is visible to torch")


def format_report(layers: list[dict]) -> str:
    width = max([len(r["name"]) for r in layers] + [5])
    lines = [f"{'layer':<{width}}  {'shape':>11}  {'pruned':>10}  {'sparsity':>8}  {'rel_error':>9}"]
    for r in layers:
        err = f"{r['rel_error']:.4f}" if r["rel_error"] is not None else "-"
        lines.append(f"{r['name']:<{width}}  {'x'.join(map(str, r['shape'])):>11}  {r['pruned']:>10}  "
                     f"{r['sparsity']:>8.4f}  {err:>9}")
    return "\n".join(lines)


def prune_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmstack prune", description="Prune a checkpoint's weights (one shot).")
    p.add_argument("--checkpoint", required=True, help="llmstack checkpoint/run folder, consolidated or HF folder")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--sparsity", default=None, help="fraction of weights removed per layer, in (0, 1); "
                                                    "with --pattern it is 1 - N/M and may be left out")
    p.add_argument("--pattern", default=None, help="N:M semi-structured, e.g. 2:4 or 4:8 (N kept in every M inputs)")
    p.add_argument("--calib-batches", default="16", help="wanda/sparsegpt: training batches for the statistics")
    p.add_argument("--out", required=True, help="new output folder (refused if it exists and is not empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of llmstack prune at --out")
    p.add_argument("--include-embeddings", action="store_true",
                   help="also prune the LM head (by --method) and the token embedding (by magnitude)")
    p.add_argument("--damp", default="0.01", help="sparsegpt: diagonal damping, fraction of mean(diag H)")
    p.add_argument("--block-size", default="128", help="sparsegpt: columns per mask-selection block")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    sparsity = _number(args.sparsity, "--sparsity", float)
    calib = _number(args.calib_batches, "--calib-batches", int)
    damp, block = _number(args.damp, "--damp", float), _number(args.block_size, "--block-size", int)
    method, sparsity, pattern = check_options(args.method, sparsity, args.pattern, damp=damp, block_size=block)
    if calib <= 0:
        raise PruneError(f"--calib-batches: got {calib}, must be > 0")
    _check_device(args.device)
    check_destination(args.out, command="prune", overwrite=args.overwrite)
    pre = load_pretrained(args.checkpoint, device=args.device)
    if pre.kind == "quantized":
        raise PruneError(f"{pre.folder}: a quantized checkpoint; prune the full-precision one (then quantize)")
    check_pattern_fits(prune_targets(pre.model, args.include_embeddings), pattern)
    batches = calibration_batches(pre.cfg, calib) if method != "magnitude" else None
    result = prune_model(pre.model, method=method, sparsity=sparsity, pattern=pattern, calib_batches=batches,
                         include_embeddings=args.include_embeddings, damp=damp, block_size=block)
    out = save_pruned(pre.model, pre.cfg, pre.tokenizer, args.out, result, source=str(pre.folder),
                      overwrite=args.overwrite)
    print(format_report(result.layers))
    print(jsonio.dumps({**result.summary(), "out": str(out), "source": str(pre.folder)}))
    return 0
