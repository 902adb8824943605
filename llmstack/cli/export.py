"""`llmstack export --format onnx|hf|peft --checkpoint DIR --out PATH`."""
from __future__ import annotations

import argparse
from pathlib import Path

from llmstack import jsonio
from llmstack.export import ExportError, export_onnx, export_peft
from llmstack.hf import ARCHITECTURES, DTYPES, export_hf, source_model_type
from llmstack.outputs import check_destination
from llmstack.pretrained import load_pretrained


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmstack export", description="Export a checkpoint to ONNX or HF format.")
    p.add_argument("--format", choices=["onnx", "hf", "peft"], required=True,
                   help="peft: a LoRA checkpoint as a PEFT adapter folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="ONNX: a new .onnx file path; hf: a new output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of llmstack export at --out")
    p.add_argument("--context-length", type=int, default=None,
                   help="ONNX: positions the graph accepts (default and at most the model's max_seq_len)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="hf: weight dtype (default float32)")
    p.add_argument("--model-type", default=None, choices=sorted(ARCHITECTURES),
                   help="hf: architecture to write (default: the one the checkpoint came from, else llama)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.format == "onnx" and out.suffix != ".onnx":
        raise ExportError(f"--out {out}: an ONNX export is a file ending in .onnx")
    if args.context_length is not None and args.format != "onnx":
        raise ExportError(f"--context-length: applies to --format onnx only, not --format {args.format}")
    for flag, value in (("--dtype", args.dtype), ("--model-type", args.model_type)):
        if value is not None and args.format != "hf":
            raise ExportError(f"{flag}: applies to --format hf only, not --format {args.format}")
    check_destination(out, command="export", overwrite=args.overwrite, is_file=args.format == "onnx")
    if args.format == "peft":
        print(jsonio.dumps({"format": "peft", **export_peft(args.checkpoint, out, overwrite=args.overwrite)}))
        return 0
    pre = load_pretrained(args.checkpoint, device="cpu", backend="torch")
    if pre.kind == "quantized":
        raise ExportError(f"{pre.folder}: quantized checkpoints are not exported; export the full-precision source "
                          f"and quantize in the target runtime")
    if args.format == "hf":
        export_hf(pre.model, pre.cfg, pre.tokenizer, out, model_type=args.model_type or source_model_type(pre.folder),
                  dtype=args.dtype or "float32", overwrite=args.overwrite)
        print(jsonio.dumps({"format": "hf", "out": args.out}))
        return 0
    eos = pre.tokenizer.eot_id if pre.tokenizer is not None else None
    info = export_onnx(pre.model, out, context_length=args.context_length, eos_token_id=eos, overwrite=args.overwrite)
    print(jsonio.dumps({"format": "onnx", **info}))
    return 0
