"""`llmstack convert --to llmstack|hf SRC DST`."""
from __future__ import annotations

import argparse
from pathlib import Path

from llmstack import jsonio
from llmstack.export import llmstack_to_hf_folder
from llmstack.hf import ARCHITECTURES, DTYPES, HFConversionError, hf_to_llmstack_checkpoint
from llmstack.outputs import check_destination


def convert_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmstack convert", description="Convert between HF folders and llmstack checkpoints.")
    p.add_argument("--to", required=True, choices=["llmstack", "hf"], help="target format")
    p.add_argument("src", help="HF folder (--to llmstack) or llmstack checkpoint/run folder (--to hf)")
    p.add_argument("dst", help="new output folder (refused if it exists and is not empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of llmstack convert at dst")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype of an HF export")
    p.add_argument("--model-type", default=None, choices=sorted(ARCHITECTURES), help="HF architecture of an export")
    args = p.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise HFConversionError(f"{src}: no such folder")
    check_destination(dst, command="convert", overwrite=args.overwrite)
    if args.to == "llmstack":
        out = hf_to_llmstack_checkpoint(src, dst, overwrite=args.overwrite)
    else:
        out = llmstack_to_hf_folder(src, dst, args.dtype, args.model_type, overwrite=args.overwrite)
    print(jsonio.dumps({"to": args.to, "src": str(src), "dst": str(out)}))
    return 0
