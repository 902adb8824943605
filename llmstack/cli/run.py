"""`llmstack train|data|eval|generate|serve`: run a config, build its data, score, sample or serve a checkpoint."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from llmstack import jsonio
from llmstack.cli.common import OneLineParser, config_parser, load_run_config
from llmstack.data import DataError, build_corpus
from llmstack.errors import UserError
from llmstack.eval import eval_text_file, eval_validation
from llmstack.generate import check_sampling, generate
from llmstack.kernels import resolve_device
from llmstack.pretrained import load_pretrained
from llmstack.train import TrainingAborted, train

log = logging.getLogger("llmstack")


def train_main(argv: list[str]) -> int:
    args = config_parser("train", "Train a model.").parse_args(argv)
    cfg = load_run_config(args)
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
    p = config_parser("data", "Build the default corpus (Python stdlib sources) and its tokenizer.", actions=["build"])
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = p.parse_args(argv)
    cfg = load_run_config(args)
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


def serve_main(argv: list[str]) -> int:
    p = OneLineParser(prog="llmstack serve", description="Serve a checkpoint (llmstack, HF, LoRA, quantized) over an "
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
    try:  # fastapi/uvicorn are the optional serve extra: imported only when serving
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
