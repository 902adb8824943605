"""The OpenAI wire format: request bodies (validated by pydantic), error objects and response bodies.

Unknown fields are ignored, as OpenAI's own server does for fields it does not know; fields
that change the result but are not implemented here (n > 1, logprobs, penalties, logit_bias,
tools, echo, suffix, best_of, non-text response formats) are refused with a 400 naming them,
never silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error answered as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # not OpenAI's (vLLM's: -1 or 0 = off)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 64)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return [("n", self.n != 1), ("presence_penalty", self.presence_penalty != 0),
                ("frequency_penalty", self.frequency_penalty != 0), ("logit_bias", bool(self.logit_bias))]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [("echo", self.echo), ("suffix", bool(self.suffix)),
                                        ("best_of", self.best_of not in (None, 1)),
                                        ("logprobs", self.logprobs is not None)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        fmt = (self.response_format or {}).get("type", "text")
        return super().unsupported() + [("logprobs", bool(self.logprobs)), ("top_logprobs", bool(self.top_logprobs)),
                                        ("tools", bool(self.tools)), ("functions", bool(self.functions)),
                                        ("tool_choice", self.tool_choice not in (None, "none")),
                                        ("response_format", fmt != "text")]


def check_supported(req: _Sampling) -> None:
    for field, used in req.unsupported():
        if used:
            raise APIError(400, f"{field}: not supported by this server (llmstack serve implements n=1 text "
                                f"generation without logprobs, penalties or tools)", param=field)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only allowed with stream: true", param="stream_options")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop sequences, got {len(items)}", param="stop")
    if any(not s for s in items):
        raise APIError(400, "stop: stop sequences must be non-empty strings", param="stop")
    return tuple(items)


def message_dicts(messages: list[Message]) -> list[dict]:
    """Messages as the chat template sees them: content as one string (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            bad = [p.type for p in m.content if p.type != "text" or p.text is None]
            if bad:
                raise APIError(400, f"messages[{i}].content: only text parts are supported, got {bad[0]!r}",
                               param=f"messages[{i}].content")
            content = "\n".join(p.text for p in m.content)
        else:
            content = m.content or ""
        d = {"role": m.role, "content": content}
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


# --- responses -------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Responder:
    """Builds the bodies of one request's response (whole, or as stream chunks) in OpenAI's format."""

    def __init__(self, kind: Literal["completion", "chat"], model: str):
        self.kind, self.model = kind, model
        self.id, self.created = new_id(kind), int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, *, text: str | None = None, role: bool = False, finish_reason: str | None = None,
              usage_counts: tuple[int, int] | None = None, no_choices: bool = False) -> dict:
        if self.kind == "chat":
            body = self._head("chat.completion.chunk")
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            body = self._head("text_completion")
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        body["choices"] = [] if no_choices else [choice]
        if usage_counts is not None:
            body["usage"] = usage(*usage_counts)
        return body
