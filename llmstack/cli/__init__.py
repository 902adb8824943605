"""`llmstack <command> ...`: the command table, logging and error printing. Each command group has
its own module here (run, convert, quantize, export, distill, checkpoint, prune) that parses and
checks its flags, calls the library function that does the work, and prints the result; a command
module is imported only when its command runs, so `llmstack train` never loads onnx or fastapi.

Errors caused by input (config, data, checkpoints, prompts) print one line and exit with status 2;
`--debug` (anywhere on the line) shows the traceback instead.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from llmstack.errors import UserError
from llmstack.versions import check_versions

# command -> (module, function taking argv, one-line help)
COMMANDS = {
    "train": ("llmstack.cli.run", "train_main", "train a model from a YAML config (+ dotted overrides)"),
    "data": ("llmstack.cli.run", "data_main", "build the default corpus: `llmstack data build`"),
    "eval": ("llmstack.cli.run", "eval_main", "loss/perplexity of a checkpoint (llmstack, HF folder or quantized)"),
    "generate": ("llmstack.cli.run", "generate_main", "generate text from a checkpoint with a KV cache"),
    "convert": ("llmstack.cli.convert", "convert_main", "convert checkpoints: --to llmstack|hf SRC DST"),
    "quantize": ("llmstack.cli.quantize", "quantize_main", "weight-only int8/int4 quantization (RTN, GPTQ)"),
    "distill": ("llmstack.cli.distill", "distill_main", "knowledge distillation from a teacher checkpoint"),
    "export": ("llmstack.cli.export", "export_main", "export a checkpoint (hf, onnx)"),
    "plan": ("llmstack.cli.checkpoint", "plan_main", "per-rank memory and layout checks for a config"),
    "checkpoint": ("llmstack.cli.checkpoint", "checkpoint_main", "checkpoint tools: consolidate"),
    "prune": ("llmstack.cli.prune", "prune_main", "prune weights (magnitude, Wanda, SparseGPT; unstructured or N:M)"),
    "serve": ("llmstack.cli.run", "serve_main", "serve a checkpoint over an OpenAI-compatible HTTP API"),
}
log = logging.getLogger("llmstack")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s llmstack" + (f"[{rank}]" if os.environ.get("WORLD_SIZE", "1") != "1" else "")
                        + " %(levelname)s %(message)s", datefmt="%H:%M:%S")


def usage() -> str:
    lines = ["usage: llmstack <command> [args] [--debug]", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # the DeepSpeed launcher puts --local_rank=N first (LOCAL_RANK is in the environment too)
    if argv and argv[0].startswith("--local_rank"):
        argv = argv[2:] if argv[0] == "--local_rank" else argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"llmstack: error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    setup_logging()
    module_name, fn_name, _ = COMMANDS[command]
    try:
        check_versions()  # before any command runs: a too-old torch fails here, not in the first attention call
        fn = getattr(importlib.import_module(module_name), fn_name)
        return int(fn(rest) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"llmstack: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        if debug:
            raise
        print(f"llmstack: error: {e.filename or e}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmstack: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
