"""`llmstack <command> ...`: argument parsing only; each command lives in its own module.

Errors caused by input (config, data, checkpoints, prompts) print one line and exit with status 2;
`--debug` (anywhere on the line) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from llmstack import jsonio
from llmstack.versions import check_versions

# command -> (module, function taking argv, one-line help)
COMMANDS = {
    "train": ("llmstack.cli", "train_main", "train a model from a YAML config (+ dotted overrides)"),
    "data": ("llmstack.cli", "data_main", "build the default corpus: `llmstack data build`"),
    "eval": ("llmstack.cli", "eval_main", "loss/perplexity of a checkpoint (llmstack, HF folder or quantized)"),
    "generate": ("llmstack.cli", "generate_main", "generate text from a checkpoint with a KV cache"),
    "convert": ("llmstack.export", "convert_main", "convert checkpoints: --to llmstack|hf SRC DST"),
    "quantize": ("llmstack.quant", "quantize_main", "weight-only int8/int4 quantization (RTN, GPTQ)"),
    "distill": ("llmstack.distill", "distill_main", "knowledge distillation from a teacher checkpoint"),
    "export": ("llmstack.export", "export_main", "export a checkpoint (hf, onnx)"),
    "plan": ("llmstack.parallel.plan", "plan_main", "per-rank memory and layout checks for a config"),
    "checkpoint": ("llmstack.parallel.consolidate", "checkpoint_main", "checkpoint tools: consolidate"),
    "prune": ("llmstack.prune.command", "prune_main", "prune weights (magnitude, Wanda, SparseGPT; unstructured or N:M)"),
    "serve": ("llmstack.cli", "serve_main", "serve a checkpoint over an OpenAI-compatible HTTP API"),
}
log = logging.getLogger("llmstack")


def setup_logging() -> None:
    import os
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s llmstack" + (f"[{rank}]" if os.environ.get("WORLD_SIZE", "1") != "1" else "")
                        + " %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _config_parser(prog: str, desc: str, actions: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"llmstack {prog}", description=desc)
    if actions:  # before the overrides, or `llmstack data build key=value` reads `build` as an override
        p.add_argument("action", choices=actions)
    p.add_argument("--config", default=None, help="run config YAML (default configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 optim.lr=3e-4")
    return p


def _load(args):
    from llmstack.config import CONFIGS_DIR, load_config
    return load_config(args.config or CONFIGS_DIR / "tiny.yaml", args.overrides)


def train_main(argv: list[str]) -> int:
    args = _config_parser("train", "Train a model.").parse_args(argv)
    cfg = _load(args)
    from llmstack.train import TrainingAborted, train
    try:
        summary = train(cfg)
    except TrainingAborted as e:
        print(f"llmstack: training aborted: {e}", file=sys.stderr)
        return 3
    keys = ("final_train_loss", "final_val_loss", "val_ppl", "tokens_per_s", "mfu", "steps", "wall_s")
    log.info("summary: %s", jsonio.dumps({k: summary.get(k) for k in keys}))
    if summary.get("signal"):  # preempted: checkpoint saved; a non-zero status lets launchers restart
        return 128 + int(summary["signal"])
    return 0


def data_main(argv: list[str]) -> int:
    p = _config_parser("data", "Build the default corpus (Python stdlib sources) and its tokenizer.", actions=["build"])
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = p.parse_args(argv)
    cfg = _load(args)
    from llmstack.data import build_corpus
    folder = build_corpus(cfg, force=args.force)
    print(jsonio.dumps({"dir": str(folder), **json.loads((folder / "meta.json").read_text())}))
    return 0


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmstack eval", description="Loss and perplexity of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder, HF folder or quantized folder")
    p.add_argument("--text-file", default=None, help="score this UTF-8 text file instead of the validation split")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default train.eval_batches)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto", help="kernel backend")
    args = p.parse_args(argv)
    from llmstack.data import DataError
    from llmstack.eval import eval_text_file, eval_validation
    from llmstack.kernels import resolve_device
    from llmstack.pretrained import load_pretrained
    if args.batches is not None and args.batches < 1:
        raise DataError(f"--batches: got {args.batches}, must be >= 1")
    pre = load_pretrained(args.checkpoint, device=resolve_device(args.device), backend=args.backend)
    result = {"checkpoint": str(pre.folder), "kind": pre.kind}
    if args.text_file:
        r = eval_text_file(pre, args.text_file)
        result.update({"loss": r["loss"], "ppl": r["ppl"], "tokens": r["tokens"]})
    else:
        result.update(eval_validation(pre, args.batches))
    result.update({"params": pre.model.num_params(), "size_bytes": pre.size_bytes})
    print(jsonio.dumps(result))
    return 0


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmstack generate", description="Generate text with a KV cache.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto", help="kernel backend")
    args = p.parse_args(argv)
    from llmstack.data import DataError
    from llmstack.generate import check_sampling, generate
    from llmstack.kernels import resolve_device
    from llmstack.pretrained import load_pretrained
    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    pre = load_pretrained(args.checkpoint, device=resolve_device(args.device), backend=args.backend)
    if pre.tokenizer is None:
        raise DataError(f"{pre.folder}: checkpoint has no tokenizer")
    prompts = [pre.tokenizer.encode(t) for t in args.prompt]
    out = generate(pre.model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_tokens=[pre.tokenizer.eot_id], seed=args.seed)
    for text, toks in zip(args.prompt, out.tokens):
        print(jsonio.dumps({"prompt": text, "completion": pre.tokenizer.decode(toks), "new_tokens": len(toks)}))
    print(jsonio.dumps({"tokens_per_s": out.tokens_per_s, "prefill_s": out.prefill_s, "decode_s": out.decode_s}))
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments become one `llmstack: error:` line (exit 2) instead of argparse's usage block."""

    def error(self, message):
        from llmstack.errors import UserError
        raise UserError(f"{self.prog}: {message}")


def serve_main(argv: list[str]) -> int:
    p = _OneLineParser(prog="llmstack serve", description="Serve a checkpoint (llmstack, HF, LoRA, quantized) over an "
                       "OpenAI-compatible API (/v1/completions, /v1/chat/completions) with continuous batching.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder, HF folder or quantized folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (the log line says which)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--api-key-env", default=None, help="name of the environment variable holding the bearer key")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask (default: context)")
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens prefilled per engine step")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    p.add_argument("--model-name", default=None, help="model id in the API (default: the checkpoint folder name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto", help="kernel backend")
    p.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16, float16")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, decode eagerly instead of with CUDA graphs")
    args = p.parse_args(argv)
    from llmstack.errors import UserError
    try:
        from llmstack.serve.server import ServeOptions, serve
    except ImportError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise UserError(f"llmstack serve needs the serve extra: pip install 'llmstack[serve]' (missing {e.name})") from None
    opts = ServeOptions(checkpoint=args.checkpoint, host=args.host, port=args.port, max_batch=args.max_batch,
                        max_queue=args.max_queue, api_key_env=args.api_key_env, max_body_bytes=args.max_body_bytes,
                        max_tokens=args.max_tokens, prefill_chunk=args.prefill_chunk, drain_timeout=args.drain_timeout,
                        device=args.device, backend=args.backend, dtype=args.dtype, chat_template=args.chat_template,
                        model_name=args.model_name, cuda_graphs=not args.no_cuda_graphs)
    return serve(opts)


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
    from llmstack.errors import UserError
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
