"""Text generation with a static, pre-allocated KV cache: one prefill, then one token per step.

Batched prompts of different lengths are left-padded into shared cache columns; each row gets
its own rotary positions and a mask that hides its padding. A padding query attends to itself
only, so its (unused) hidden states stay finite and never poison the cache.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from llmstack.errors import UserError


class GenerationError(UserError):
    pass


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
             top_k: int | None = None, top_p: float | None = None, stop_tokens=(), seed: int | None = None) -> Generation:
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

    model.setup_cache(B, total)
    try:
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
            logits = model.forward_cached(nxt[:, None], s, positions[:, s:s + 1], key_valid[:, None, None, :s + 1])[:, -1]
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
