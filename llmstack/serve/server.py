"""`serve(options)`: load a checkpoint, start the engine, and run the API under uvicorn until a signal.

SIGTERM (or SIGINT) drains: uvicorn closes the listening socket, answers nothing new, waits up to
`drain_timeout` seconds for in-flight responses to finish, then the engine stops and `serve`
returns 0. Uvicorn re-raises the signal once it is done; the handler installed here absorbs it,
so a drained server exits 0 rather than dying by the signal.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from llmstack.errors import UserError
from llmstack.pretrained import load_pretrained
from llmstack.serve.app import ServerState, create_app
from llmstack.serve.engine import Engine
from llmstack.serve.text import ChatFormatter

log = logging.getLogger("llmstack")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ServeError(UserError):
    pass


@dataclass
class ServeOptions:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_queue: int = 64
    api_key_env: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens: int | None = None  # None: the model's context
    prefill_chunk: int = 128
    drain_timeout: float = 30.0
    device: str = "cpu"
    backend: str = "auto"
    dtype: str = "auto"  # auto: as loaded
    chat_template: str | None = None
    model_name: str | None = None  # default: the checkpoint folder's name
    cuda_graphs: bool = True

    def validate(self) -> None:
        positive = {"--max-batch": self.max_batch, "--max-body-bytes": self.max_body_bytes,
                    "--prefill-chunk": self.prefill_chunk}
        for flag, value in positive.items():
            if value < 1:
                raise ServeError(f"{flag}: must be at least 1, got {value}")
        if self.max_queue < 0:
            raise ServeError(f"--max-queue: must be 0 or more, got {self.max_queue}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ServeError(f"--max-tokens: must be at least 1, got {self.max_tokens}")
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port: must be in [0, 65535], got {self.port}")
        if not self.drain_timeout > 0:
            raise ServeError(f"--drain-timeout: must be positive, got {self.drain_timeout}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ServeError(f"--dtype: got {self.dtype!r}, allowed: auto, {', '.join(DTYPES)}")
        if self.model_name is not None and not self.model_name.strip():
            raise ServeError("--model-name: must not be empty")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ServeError(f"--chat-template {self.chat_template}: no such file")

    def api_key(self) -> str | None:
        """The bearer key from the environment variable named by --api-key-env (never logged)."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise ServeError(f"--api-key-env {self.api_key_env}: that environment variable is not set or empty")
        return key


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ServeError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    return sock


def stop_token_ids(pre) -> set[int]:
    """The tokenizer's end-of-text plus the eos ids of an HF folder's generation_config.json."""
    ids = {pre.tokenizer.eot_id} - {None}
    path = Path(pre.folder) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ServeError(f"{path}: not a JSON object") from None
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int):
                ids.add(i)
    return ids


def build_state(opts: ServeOptions) -> ServerState:
    """Load the checkpoint and build the engine (CUDA graphs captured here, before any request)."""
    pre = load_pretrained(opts.checkpoint, device=opts.device, backend=opts.backend)
    if pre.tokenizer is None:
        raise ServeError(f"--checkpoint {pre.folder}: the checkpoint has no tokenizer, so text cannot be served")
    model = pre.model
    if opts.dtype != "auto":
        model = model.to(DTYPES[opts.dtype])
    context = model.cfg.max_seq_len
    if opts.max_tokens is not None and opts.max_tokens >= context:
        raise ServeError(f"--max-tokens: {opts.max_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens")
    chat = ChatFormatter(pre.tokenizer, opts.chat_template)
    static = torch.device(opts.device).type == "cuda" and opts.cuda_graphs
    engine = Engine(model, pre.tokenizer, max_batch=opts.max_batch, max_queue=opts.max_queue,
                    prefill_chunk=opts.prefill_chunk, static_decode=static, stop_ids=stop_token_ids(pre))
    name = opts.model_name or Path(opts.checkpoint).resolve().name
    return ServerState(engine=engine, tokenizer=pre.tokenizer, chat=chat, model_name=name, context=context,
                       max_tokens=opts.max_tokens or context - 1, created=int(time.time()))


def serve(opts: ServeOptions) -> int:
    opts.validate()
    api_key = opts.api_key()
    sock = _bind(opts.host, opts.port)  # before the (slow) load: a taken port fails at once
    try:
        state = build_state(opts)
    except BaseException:
        sock.close()
        raise
    if not _is_loopback(opts.host) and api_key is None:
        log.warning("listening on %s without --api-key-env: anyone who can reach this port can use the model",
                    opts.host)
    app = create_app(state, api_key=api_key, max_body_bytes=opts.max_body_bytes)
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=opts.drain_timeout, timeout_keep_alive=5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the signal handler: flags only, no I/O
            state.draining = True
            super().handle_exit(sig, frame)

    server = Server(config)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # IPv6 in a URL

    async def main():
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            chat = state.chat.source or "none (chat completions refused)"
            log.info("serving %s on http://%s:%d (max batch %d, queue %d, context %d, auth %s, chat template: %s, "
                     "decode: %s)", state.model_name, host, port, opts.max_batch, opts.max_queue, state.context,
                     "on" if api_key else "off", chat, "CUDA graphs" if state.engine.decoder else "eager")
        while not task.done():
            if server.should_exit:
                log.info("stopping: refusing new requests, draining in-flight ones (up to %.0f s)", opts.drain_timeout)
                break
            await asyncio.sleep(0.1)
        await task

    # uvicorn restores this handler after its graceful shutdown and re-raises the signal into it
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    log.info("stopped: %s", state.engine.stats()["finished"])
    return 0
