"""`llmstack quantize --checkpoint DIR --bits 8|4 [--method rtn|gptq] --out DIR`."""
from __future__ import annotations

import argparse
import math

from llmstack import jsonio
from llmstack.calibration import calibration_batches
from llmstack.hf import DTYPES
from llmstack.kernels import resolve_device
from llmstack.outputs import check_destination
from llmstack.pretrained import load_pretrained
from llmstack.quant import WEIGHTS_FILE, QuantError, check_options, quantize_model, save_quantized


def quantize_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmstack quantize", description="Weight-only int8/int4 quantization.")
    p.add_argument("--checkpoint", required=True, help="llmstack checkpoint/run folder or HF folder")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument("--group-size", type=int, default=128, help="int4: input columns per scale/zero point")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--out", required=True, help="new output folder (refused if it exists and is not empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of llmstack quantize at --out")
    p.add_argument("--calib-batches", type=int, default=16, help="GPTQ: training batches for the Hessians")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: diagonal damping, fraction of mean(diag H)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                   help="dtype of the unquantized tensors (embedding, norms, LM head); GPTQ servers expect float16")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    check_options(args.bits, args.group_size, args.method)
    if not (math.isfinite(args.damp) and args.damp > 0):
        raise QuantError(f"--damp: got {args.damp}, must be a finite number > 0")
    if args.calib_batches < 1:
        raise QuantError(f"--calib-batches: got {args.calib_batches}, must be >= 1")
    check_destination(args.out, command="quantize", overwrite=args.overwrite)
    pre = load_pretrained(args.checkpoint, device=resolve_device(args.device))
    if pre.kind == "quantized":
        raise QuantError(f"{pre.folder}: already quantized; quantize the full-precision checkpoint")
    calib = calibration_batches(pre.cfg, args.calib_batches) if args.method == "gptq" else None
    report = quantize_model(pre.model, bits=args.bits, group_size=args.group_size, method=args.method,
                            calib_batches=calib, damp=args.damp, act_order=args.act_order)
    out = save_quantized(pre.model, pre.cfg, tokenizer=pre.tokenizer, out=args.out, report=report, dtype=args.dtype,
                         overwrite=args.overwrite)
    size = (out / WEIGHTS_FILE).stat().st_size
    print(jsonio.dumps({**report, "out": str(out), "size_bytes": size, "source_size_bytes": pre.size_bytes}))
    return 0
