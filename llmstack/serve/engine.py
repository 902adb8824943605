"""Continuous batching over a slot-based KV cache.

The cache has `max_batch` rows (slots) of `max_seq_len + 1` columns (the last one is a scratch
column for padding). A request holds one row from admission to its end, and its tokens sit at
columns 0, 1, ... of that row, so a row's rotary positions are its column numbers. Each
iteration of the engine thread:

1. frees the rows of cancelled requests (a client that disconnected);
2. runs one decode step for every decoding request together: one token per row, each row at its
   own column (`CacheIndex`), then samples each row with its own settings (temperature, top-p,
   top-k, seed) and checks its own stop conditions; finished requests leave at once;
3. admits waiting requests into free rows and spends at most `prefill_chunk` prompt tokens on
   prefilling newcomers (oldest first, chunked: a long prompt takes several iterations), in one
   batched forward. A newcomer whose prompt is done samples its first token and joins the next
   decode step. So a newcomer stalls the running requests by at most one chunk per step (when
   nothing is decoding, the budget is a chunk per slot: nobody is stalled).

Decoding requests occupy rows [0, n_dec) so the decode step reads the cache through a view; when
one finishes, the last decoding row moves into its place (a copy of that row's filled columns).
Prefilling requests sit in any free row above and are read through a gather.

Greedy decoding (temperature 0) is the argmax of the same model, mask and positions as
`llmstack generate`; the batch only changes the order of float sums inside matrix products
(~1e-5 relative in fp32), so tokens equal `generate`'s unless two logits are that close.
"""
from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import torch

from llmstack.data import Tokenizer
from llmstack.generate import StaticDecoder, sample_next
from llmstack.model import CacheIndex
from llmstack.serve.text import TextStream

log = logging.getLogger("llmstack")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is at capacity; retry in {retry_after} s")
        self.retry_after = retry_after


class EngineStopped(Exception):
    pass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What a request's consumer receives: new text, and at the end a finish reason
    ("stop", "length", "cancelled" or "error") with the final token counts."""
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Request:
    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None], *,
                 request_id: str = ""):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.on_event = on_event
        self.row = -1
        self.cached = 0  # tokens written into the cache row (prompt first, then generated)
        self.generated: list[int] = []
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        self.cancelled = False
        self.finished = False
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def emit(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # a consumer that went away (event loop closed) must not stop the engine
            log.debug("request %s: event not delivered", self.id, exc_info=True)


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 128, static_decode: bool | None = None, stop_ids: set[int] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_len = model.cfg.max_seq_len
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        # tokens that end a completion: the tokenizer's end-of-text unless the caller knows more (an HF
        # generation_config.json may list several, e.g. Llama 3's end-of-turn)
        self.stop_ids = stop_ids if stop_ids is not None else ({tokenizer.eot_id} - {None})
        self.cache_len = self.max_len + 1
        self.scratch = self.max_len
        model.setup_cache(max_batch, self.cache_len)
        if static_decode is None:
            static_decode = self.device.type == "cuda"
        self.decoder = (StaticDecoder(model, max_batch=max_batch, cache_len=self.cache_len,
                                      capture=self.device.type == "cuda") if static_decode else None)
        self.rows: list[Request | None] = [None] * max_batch
        self.n_dec = 0
        self.prefilling: list[Request] = []
        self._waiting: deque[Request] = deque()
        self._occupied = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counts: Counter = Counter()
        self.generated_tokens = 0
        self.peak_batch = 0  # most requests decoded in one step so far
        self._avg_request_s = 0.0

    # --- the API side (any thread) ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmstack-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still in it end with finish_reason "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():  # never pull the cache from under a step
            self.model.clear_cache()

    def submit(self, req: Request) -> None:
        if len(req.prompt) + req.params.max_tokens > self.max_len or not req.prompt:
            raise ValueError(f"prompt of {len(req.prompt)} tokens + max_tokens {req.params.max_tokens} does not fit "
                             f"the context of {self.max_len}")
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if self._occupied + len(self._waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(self._retry_after())
            self._waiting.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """Free the request's slot at the next step boundary (a client went away)."""
        with self._cond:
            if req.finished:
                return
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                self._end(req, "cancelled", "")
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"running": self.n_dec, "prefilling": len(self.prefilling), "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "peak_batch": self.peak_batch, "finished": dict(self.counts),
                    "generated_tokens": self.generated_tokens}

    def _retry_after(self) -> int:
        per_request = self._avg_request_s or 1.0
        return max(1, min(60, math.ceil(per_request * (len(self._waiting) + 1) / self.max_batch)))

    # --- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self.n_dec and not self.prefilling:
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception as e:  # never leave clients hanging: fail what was in flight, keep serving
                    log.exception("engine step failed")
                    for req in [r for r in self.rows if r is not None]:
                        self._end(req, "error", "", error=f"internal error: {e.__class__.__name__}")
        for req in [r for r in self.rows if r is not None] + list(self._waiting):
            self._end(req, "cancelled", "", error="the server shut down before the request finished")

    def _step(self) -> None:
        for req in [r for r in self.rows if r is not None and r.cancelled]:
            self._end(req, "cancelled", "")
        if self.n_dec:
            self._decode()
        self._admit()
        if self.prefilling:
            self._prefill()

    def _admit(self) -> None:
        with self._cond:
            while self._waiting and self._occupied < self.max_batch:
                req = self._waiting.popleft()
                req.row = self.rows.index(None, self.n_dec)
                self.rows[req.row] = req
                self._occupied += 1
                req.stream = TextStream(self.tokenizer, req.params.stop)
                seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
                req.generator = torch.Generator(device=self.device).manual_seed(seed)
                self.prefilling.append(req)

    def _decode(self) -> None:
        reqs = self.rows[:self.n_dec]
        self.peak_batch = max(self.peak_batch, len(reqs))
        tokens = torch.tensor([r.generated[-1] for r in reqs], device=self.device)
        cols = torch.tensor([r.cached for r in reqs], device=self.device)
        span = max(r.cached for r in reqs) + 1
        key_valid = torch.arange(span, device=self.device)[None] <= cols[:, None]
        if self.decoder is not None:
            logits = self.decoder(tokens, cols=cols, positions=cols, key_valid=key_valid)
        else:
            at = CacheIndex(rows=slice(0, len(reqs)), cols=cols, span=span)
            logits = self.model.forward_cached(tokens[:, None], at, cols[:, None], key_valid[:, None, None])[:, -1]
        for r in reqs:
            r.cached += 1
        for r, t in zip(reqs, self._sample(logits, reqs)):
            self._accept(r, t)

    def _prefill(self) -> None:
        # The chunk bounds how long running requests wait for a newcomer; with none running there is
        # nobody to stall, so every waiting prompt may go at once (up to a chunk per slot).
        budget = self.prefill_chunk if self.n_dec else self.prefill_chunk * self.max_batch
        chunks = []
        for req in self.prefilling:
            if budget == 0:
                break
            n = min(len(req.prompt) - req.cached, budget)
            chunks.append((req, req.cached, n))
            budget -= n
        T = max(n for _, _, n in chunks)
        span = max(start + n for _, start, n in chunks)
        tokens = torch.zeros(len(chunks), T, dtype=torch.long)
        positions = torch.zeros(len(chunks), T, dtype=torch.long)
        cols = torch.full((len(chunks), T), self.scratch, dtype=torch.long)  # padding writes the scratch column
        mask = torch.zeros(len(chunks), 1, T, span, dtype=torch.bool)
        mask[:, 0, :, 0] = True  # a padding query attends to column 0 only, so it stays finite
        keys = torch.arange(span)
        for i, (req, start, n) in enumerate(chunks):
            pos = torch.arange(start, start + n)
            tokens[i, :n] = torch.tensor(req.prompt[start:start + n])
            positions[i, :n] = cols[i, :n] = pos
            mask[i, 0, :n] = keys[None] <= pos[:, None]
        dev = self.device
        at = CacheIndex(rows=torch.tensor([r.row for r, _, _ in chunks], device=dev), cols=cols.to(dev), span=span)
        h = self.model.hidden_states(tokens.to(dev), positions.to(dev), None, at, mask.to(dev))
        for req, start, n in chunks:
            req.cached = start + n
        done = [i for i, (req, start, n) in enumerate(chunks) if req.cached == len(req.prompt)]
        if not done:
            return
        last = h[torch.tensor(done, device=dev), torch.tensor([chunks[i][2] - 1 for i in done], device=dev)]
        logits = self.model.output(last).float()
        reqs = [chunks[i][0] for i in done]
        for req in reqs:
            self._promote(req)
        for req, t in zip(reqs, self._sample(logits, reqs)):
            self._accept(req, t)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        ids = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(reqs):
            p = r.params
            if p.temperature > 0:
                ids[i] = int(sample_next(logits[i:i + 1], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                         generator=r.generator)[0])
        return ids

    def _accept(self, req: Request, token: int) -> None:
        req.generated.append(token)
        self.generated_tokens += 1
        if req.t_first is None:
            req.t_first = time.perf_counter()
        if token in self.stop_ids:
            self._end(req, "stop", req.stream.finish())
            return
        delta = req.stream.add(token)
        if req.stream.stopped:
            self._end(req, "stop", delta)
        elif len(req.generated) >= req.params.max_tokens:
            self._end(req, "length", delta + req.stream.finish())
        elif delta:
            req.emit(Event(delta, None, len(req.prompt), len(req.generated)))

    def _end(self, req: Request, reason: str, text: str, error: str | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        if req.row >= 0:
            self._release(req)
        elapsed = time.perf_counter() - req.t_submit
        with self._cond:  # an RLock: cancel() calls this holding it
            self.counts[reason] += 1
            if reason in ("stop", "length"):
                self._avg_request_s = elapsed if not self._avg_request_s else 0.9 * self._avg_request_s + 0.1 * elapsed
        ttft = f"{req.t_first - req.t_submit:.3f}s" if req.t_first else "-"
        log.info("request %s: %s, %d prompt + %d completion tokens, first token %s, total %.3fs", req.id, reason,
                 len(req.prompt), len(req.generated), ttft, elapsed)
        req.emit(Event(text, reason, len(req.prompt), len(req.generated), error))

    # --- rows ---------------------------------------------------------------------------------
    def _caches(self):
        return [t for layer in self.model.layers for t in (layer.attention.cache.k, layer.attention.cache.v)]

    def _move(self, src: int, dst: int) -> None:
        req = self.rows[src]
        for buf in self._caches():
            buf[dst, :req.cached] = buf[src, :req.cached]
        self.rows[dst], self.rows[src], req.row = req, None, dst

    def _swap(self, a: int, b: int) -> None:
        ra, rb = self.rows[a], self.rows[b]
        for buf in self._caches():
            keep = buf[a, :ra.cached].clone()
            buf[a, :rb.cached] = buf[b, :rb.cached]
            buf[b, :ra.cached] = keep
        self.rows[a], self.rows[b], ra.row, rb.row = rb, ra, b, a

    def _promote(self, req: Request) -> None:
        """A prefilled request joins the decoding rows [0, n_dec)."""
        self.prefilling.remove(req)
        if req.row != self.n_dec:
            if self.rows[self.n_dec] is None:
                self._move(req.row, self.n_dec)
            else:
                self._swap(req.row, self.n_dec)
        self.n_dec += 1

    def _release(self, req: Request) -> None:
        row = req.row
        if row < self.n_dec:
            last = self.n_dec - 1
            self.rows[row] = None
            if row != last:
                self._move(last, row)
            self.n_dec -= 1
        else:
            self.prefilling.remove(req)
            self.rows[row] = None
        req.row = -1
        with self._cond:
            self._occupied -= 1
