"""The HTTP API over the engine: FastAPI routes in OpenAI's format, SSE streaming, and the guards.

- `Guard` (plain ASGI, before any route): 503 while draining, the bearer key on /v1/* (401),
  and the body size limit (413, checked on Content-Length and while reading, so an oversized
  body is never buffered whole).
- Validation errors and malformed JSON are 400s with OpenAI's error object; so are fields the
  server does not implement (protocol.py). A full queue is a 429 with Retry-After.
- A request's tokens reach its handler through an asyncio queue fed from the engine thread.
  A client that disconnects cancels its request: streaming responses are cancelled by Starlette
  when the connection drops, non-streaming ones watch the connection while they wait.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from llmstack import jsonio
from llmstack.data import Tokenizer
from llmstack.serve.engine import Engine, EngineStopped, Event, QueueFull, Request, SamplingParams
from llmstack.serve.protocol import (APIError, ChatRequest, CompletionRequest, Responder, check_supported, error_body,
                                     message_dicts, stop_strings)
from llmstack.serve.text import ChatFormatter, ChatTemplateError

log = logging.getLogger("llmstack")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Tokenizer
    chat: ChatFormatter
    model_name: str
    context: int  # the model's context length in tokens
    max_tokens: int  # the largest max_tokens a request may ask for
    created: int
    draining: bool = False
    sink: EventSink | None = None  # set at start-up, on the server's event loop


class EventSink:
    """Hands engine events (engine thread) to the request queues (event loop), one loop wake-up for
    all the events posted meanwhile: a decode step of 16 requests wakes the loop once, not 16 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, Event]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._pending, self._scheduled = self._pending, [], False
        for queue, event in items:
            queue.put_nowait(event)


def _json_bytes(obj: dict) -> bytes:
    return jsonio.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _sse(obj: dict) -> str:
    return "data: " + jsonio.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class Guard:
    """ASGI middleware: draining, auth and the body size limit, in that order."""

    def __init__(self, app, *, state: ServerState, api_key: str | None, max_body_bytes: int):
        self.app, self.state, self.max_body_bytes = app, state, max_body_bytes
        self._key = api_key.encode() if api_key else None

    async def _refuse(self, send, err: APIError) -> None:
        body = _json_bytes(err.body())
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _check_key(self, headers: dict[bytes, bytes]) -> APIError | None:
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key")
        if not hmac.compare_digest(token.strip(), self._key):
            return APIError(401, "incorrect API key", code="invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = scope["path"].startswith("/v1/")
        if api and self.state.draining:
            return await self._refuse(send, APIError(503, "the server is shutting down", type="server_error",
                                                     code="shutting_down"))
        headers = dict(scope["headers"])
        if api and self._key is not None:
            err = self._check_key(headers)
            if err is not None:
                return await self._refuse(send, err)
        limit = self.max_body_bytes
        too_large = APIError(413, f"request body over the limit of {limit} bytes (--max-body-bytes)",
                             code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._refuse(send, APIError(400, "Content-Length: not a number"))
            if int(declared) > limit:
                return await self._refuse(send, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > limit:
                return await self._refuse(send, too_large)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"malformed JSON in the request body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {e.get('msg')}" if param else f"request body: {e.get('msg')}"), param


def create_app(state: ServerState, *, api_key: str | None, max_body_bytes: int) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        state.sink = EventSink(asyncio.get_running_loop())
        state.engine.start()
        yield
        state.engine.shutdown()

    app = FastAPI(title="llmstack serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llm = state

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", type=kind),
                            status_code=exc.status_code)

    @app.get("/health")
    async def health():
        body = {"status": "draining" if state.draining else "ok", "model": state.model_name, **state.engine.stats()}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "llmstack", "max_model_len": state.context}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        _check_common(state, body)
        prompt = await asyncio.to_thread(_completion_prompt, state, body.prompt)  # long texts: off the event loop
        return await _generate(state, request, body, prompt, Responder("completion", state.model_name),
                               default_max=COMPLETIONS_DEFAULT_MAX_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: HTTPRequest):
        _check_common(state, body)
        try:
            text = state.chat.render(message_dicts(body.messages))
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages", code="chat_template_missing"
                           if not state.chat.available else None) from None
        prompt = await asyncio.to_thread(state.tokenizer.encode, text)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(state, request, body, prompt, Responder("chat", state.model_name), default_max=None)

    return Guard(app, state=state, api_key=api_key, max_body_bytes=max_body_bytes)


def _check_common(state: ServerState, body) -> None:
    if body.model != state.model_name:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    check_supported(body)


def _completion_prompt(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: one prompt per request (got {len(prompt)}); send them as separate requests",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = state.tokenizer.encode(prompt)
    else:
        vocab = state.engine.model.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} outside the vocabulary [0, {vocab})", param="prompt")
        ids = list(prompt)
    # An empty prompt starts a document: the end-of-text token is what precedes every document in training.
    if not ids and state.tokenizer.eot_id is not None:
        ids = [state.tokenizer.eot_id]
    if not ids:
        raise APIError(400, "prompt: empty", param="prompt")
    return ids


def _sampling(state: ServerState, body, n_prompt: int, default_max: int | None) -> SamplingParams:
    room = state.context - n_prompt
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {state.context} tokens and the prompt has "
                            f"{n_prompt}; no room for a completion", param="messages" if default_max is None else
                       "prompt", code="context_length_exceeded")
    if body.max_tokens is None:
        max_tokens = min(state.max_tokens, room, default_max or room)
    else:
        max_tokens = body.max_tokens
        if max_tokens > state.max_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is over this server's limit of {state.max_tokens} "
                                f"(--max-tokens)", param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {state.context} tokens; the request asks "
                                f"for {n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} for the "
                                f"completion)", param="max_tokens", code="context_length_exceeded")
    top_k = body.top_k if body.top_k and body.top_k > 0 else None
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=top_k,
                          seed=body.seed, stop=stop_strings(body.stop))


async def _generate(state: ServerState, request: HTTPRequest, body, prompt: list[int], responder: Responder,
                    default_max: int | None):
    params = _sampling(state, body, len(prompt), default_max)
    queue: asyncio.Queue[Event] = asyncio.Queue()
    req = Request(prompt, params, lambda ev: state.sink.post(queue, ev), request_id=responder.id)
    try:
        state.engine.submit(req)
    except QueueFull as e:
        raise APIError(429, f"too many requests: {e}", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except EngineStopped:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(state, req, queue, responder, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, last = await _collect(state, request, req, queue)
    if last is None:  # the client went away; nobody reads this
        return JSONResponse(error_body("client disconnected"), status_code=499)
    if last.finish_reason in ("error", "cancelled"):
        status = 500 if last.finish_reason == "error" else 503
        raise APIError(status, last.error or "the request was cancelled", type="server_error")
    return responder.complete(text, last.finish_reason, last.prompt_tokens, last.completion_tokens)


async def _wait_disconnect(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(state: ServerState, request: HTTPRequest, req: Request, queue: asyncio.Queue):
    """(text, final event) of a non-streaming request, or (.., None) if the client disconnected first."""
    async def drain():
        parts = []
        while True:
            ev = await queue.get()
            parts.append(ev.text)
            if ev.finish_reason:
                return "".join(parts), ev
    consumer = asyncio.ensure_future(drain())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            return consumer.result()
        return "", None
    finally:
        for task in (consumer, watcher):
            task.cancel()
        state.engine.cancel(req)  # no-op once finished


def _sse_events(ev: Event, responder: Responder, include_usage: bool) -> list[str]:
    """The server-sent events for one engine event (the last ones end the stream)."""
    if ev.finish_reason in ("error", "cancelled"):
        return [_sse(error_body(ev.error or "the request was cancelled", type="server_error"))]
    out = [_sse(responder.chunk(text=ev.text))] if ev.text else []
    if ev.finish_reason:
        counts = (ev.prompt_tokens, ev.completion_tokens)
        out.append(_sse(responder.chunk(finish_reason=ev.finish_reason, usage_counts=None if include_usage else counts)))
        if include_usage:
            out.append(_sse(responder.chunk(no_choices=True, usage_counts=counts)))
        out.append("data: [DONE]\n\n")
    return out


async def _stream(state: ServerState, req: Request, queue: asyncio.Queue, responder: Responder, include_usage: bool):
    try:
        if responder.kind == "chat":
            yield _sse(responder.chunk(role=True))
        while True:
            events = [await queue.get()]
            while not queue.empty():  # the loop fell behind the engine: one write for all of them
                events.append(queue.get_nowait())
            out = [line for ev in events for line in _sse_events(ev, responder, include_usage)]
            if out:
                yield "".join(out)
            if events[-1].finish_reason:
                return
    finally:  # also when Starlette cancels us because the client disconnected
        state.engine.cancel(req)
