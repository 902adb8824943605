"""Text generation with a static, pre-allocated KV cache: one prefill, then one token per step.

Batched prompts of different lengths are left-padded into shared cache columns; each row gets
its own rotary positions and a mask that hides its padding. A padding query attends to itself
only, so its (unused) hidden states stay finite and never poison the cache.

On CUDA the decode step runs as a CUDA graph (`StaticDecoder`): a small model's step is a few
hundred kernel launches of microseconds each, so replaying them as one graph removes the launch
overhead that otherwise bounds decode speed. On CPU the eager step is kept.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from llmstack.errors import UserError
from llmstack.model import CacheIndex


class GenerationError(UserError):
    pass


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a static decoder is built for: powers of two below max_batch, and max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class StaticDecoder:
    """One decode step ([B] tokens, each row at its own cache column) with static shapes.

    The batch is padded up to a bucket of `batch_buckets` and attention spans the whole cache
    under a mask, so every call of a bucket has the same shapes and addresses: on CUDA each bucket
    is captured once as a CUDA graph and replayed. Padded rows write into the cache's last column,
    a scratch column that no real query ever attends to (callers allocate it: cache_len is one
    more than the longest sequence). Without `capture` the same computation runs eagerly (tests).

    The graphs hold the addresses of the model's KV cache: build this after `setup_cache` and
    drop it before the cache is replaced. Cache rows [0, bucket) must be the decoding rows.
    """

    def __init__(self, model, *, max_batch: int, cache_len: int, capture: bool, buckets: list[int] | None = None):
        self.model = model
        self.cache_len = cache_len
        self.scratch = cache_len - 1
        self.buckets = sorted(buckets or batch_buckets(max_batch))
        device = next(model.parameters()).device
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.cols = torch.full((max_batch,), self.scratch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.valid = torch.zeros(max_batch, 1, 1, cache_len, dtype=torch.bool, device=device)
        self.valid[..., self.scratch] = True
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    def _forward(self, nb: int) -> torch.Tensor:
        at = CacheIndex(rows=slice(0, nb), cols=self.cols[:nb], span=self.cache_len)
        return self.model.forward_cached(self.tokens[:nb], at, self.positions[:nb], self.valid[:nb])[:, -1]

    def _capture_all(self) -> None:
        # The buffers hold padding now, so warm-up and capture write the scratch column only.
        pool = torch.cuda.graph_pool_handle()
        for nb in reversed(self.buckets):  # largest first: the shared pool then fits the smaller ones
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # Triton autotuning and lazy inits happen outside the capture
                for _ in range(2):
                    self._forward(nb)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(nb)
            self.graphs[nb] = (graph, out)
        torch.cuda.synchronize()

    def __call__(self, tokens: torch.Tensor, *, cols: torch.Tensor, positions: torch.Tensor,
                 key_valid: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of tokens [B] written at cache columns cols [B] (rotary positions [B]),
        each row attending to the columns where key_valid [B, S] is true (S < cache_len)."""
        b, S = tokens.shape[0], key_valid.shape[-1]
        nb = next(n for n in self.buckets if n >= b)
        self.tokens[:b, 0] = tokens
        self.tokens[b:nb] = 0
        self.cols[:b] = cols
        self.cols[b:nb] = self.scratch
        self.positions[:b, 0] = positions
        self.positions[b:nb] = 0
        self.valid[:b, 0, 0, :S] = key_valid
        self.valid[:b, 0, 0, S:] = False
        self.valid[b:nb] = False
        self.valid[b:nb, ..., self.scratch] = True
        if nb in self.graphs:
            graph, out = self.graphs[nb]
            graph.replay()
        else:
            out = self._forward(nb)
        return out[:b]


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (stop token excluded)
    tokens_per_s: float  # decode throughput, all rows together
    prefill_s: float
    decode_s: float


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [B, V]: greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One-line errors naming the option, for the CLI, the server and library callers alike."""
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens: got {max_new_tokens}, must be >= 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"--temperature: got {temperature}, must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"--top-k: got {top_k}, must be >= 1")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise GenerationError(f"--top-p: got {top_p}, allowed (0, 1]")


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=(), seed: int | None = None,
             static_decode: bool | None = None) -> Generation:
    """New tokens for each prompt. `static_decode` (default: on CUDA) runs the decode step through
    a `StaticDecoder`, captured as a CUDA graph on CUDA and eagerly elsewhere."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    max_len = model.cfg.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_len:
        raise GenerationError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                              f"context of {max_len} tokens")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    B, P = len(prompts), longest
    total = P + max_new_tokens
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, device=device)
    slots = torch.arange(total, device=device)
    key_valid = slots[None, :] >= pad[:, None]  # [B, total]
    positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # rotary position per row and slot
    stop = torch.tensor(list(stop_tokens) or [-1], device=device)

    if static_decode is None:  # capturing costs a few forwards: worth it for longer generations
        static_decode = device.type == "cuda" and max_new_tokens >= 16
    model.setup_cache(B, total + 1 if static_decode else total)  # + the static decoder's scratch column
    try:
        decoder = StaticDecoder(model, max_batch=B, cache_len=total + 1, capture=device.type == "cuda",
                                buckets=[B]) if static_decode and max_new_tokens > 1 else None
        t0 = time.perf_counter()
        causal = torch.tril(torch.ones(P, P, dtype=torch.bool, device=device))
        mask = (causal[None] & key_valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)[None]
        logits = model.forward_cached(tokens, 0, positions[:, :P], mask[:, None])[:, -1]
        t1 = time.perf_counter()
        out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n = 0
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            out[:, i] = nxt
            n = i + 1
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            s = P + i
            if decoder is not None:
                logits = decoder(nxt, cols=torch.full_like(nxt, s), positions=positions[:, s],
                                 key_valid=key_valid[:, :s + 1])
            else:
                logits = model.forward_cached(nxt[:, None], s, positions[:, s:s + 1],
                                              key_valid[:, None, None, :s + 1])[:, -1]
        t2 = time.perf_counter()
    finally:
        model.clear_cache()
        model.train(was_training)
    result = []
    for row in out[:, :n].tolist():
        cut = next((j for j, t in enumerate(row) if t in set(stop_tokens)), len(row))
        result.append(row[:cut])
    return Generation(result, B * n / max(t2 - t1, 1e-9) if n > 1 else 0.0, t1 - t0, t2 - t1)


@torch.no_grad()
def generate_uncached_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference decoding: the full forward over the growing sequence each step (for tests)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seq = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([seq], device=device))[0, -1]
        seq.append(int(logits.argmax()))
    model.train(was_training)
    return seq[len(prompt):]
