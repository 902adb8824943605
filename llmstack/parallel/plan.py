"""`llmstack plan`: check a tensor x pipeline x data layout and estimate per-rank memory.

    llmstack plan --config configs/recipes/7b.yaml --gpus 16 --gpu-mem 80GB parallel.tp=4 parallel.pp=2

`check_layout(cfg, world_size)` is the same check the trainer runs before any process group
exists; each problem is one line naming the setting (a `LayoutError`, exit status 2).

Memory model (bytes per rank; Korthikanti et al. 2022 for activations, flash attention so no
s^2 term): weights 2 (bf16) or 4 (fp32) per parameter, fp32 master copy for bf16, gradients 4,
AdamW moments 8; ZeRO-1 partitions the optimizer states over dp, ZeRO-2 also the gradients,
ZeRO-3 also the weights. Activations per layer and micro-batch: s*b*h*(10 + 24/tp) bytes in bf16
(x2 in fp32), s*b*h*2 with per-layer checkpointing; 1F1B keeps up to `pp` micro-batches in flight.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from llmstack.config import Config, ModelConfig
from llmstack.errors import UserError
from llmstack.kernels.chunked_loss import loss_chunk_tokens


class LayoutError(UserError):
    """A layout that cannot run; one line naming the setting."""


def _json_batch(cfg: Config) -> dict:
    path = cfg.parallel.deepspeed_config
    if not path:
        return {}
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise LayoutError(f"parallel.deepspeed_config: {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise LayoutError(f"parallel.deepspeed_config: {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    out = {}
    stage = raw.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != cfg.parallel.zero_stage:
        raise LayoutError(f"parallel.deepspeed_config: {path} sets zero_optimization.stage={stage} "
                          f"but parallel.zero_stage={cfg.parallel.zero_stage}")
    return {**out, **{k: raw[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
            if k in raw and raw[k] != "auto"}}


def check_tp_split(model: ModelConfig, tp: int) -> None:
    """What tensor parallelism shards must divide by `tp`: heads, key/value heads, the
    vocab-parallel head and the MLP hidden size."""
    if model.n_heads % tp:
        raise LayoutError(f"parallel.tp: {tp} does not divide model.n_heads={model.n_heads}")
    if model.kv_heads % tp:
        raise LayoutError(f"parallel.tp: {tp} does not divide model.n_kv_heads={model.kv_heads} "
                          f"(key/value heads are not replicated; use tp <= {model.kv_heads} dividing it)")
    if model.vocab_size % tp:
        raise LayoutError(f"parallel.tp: {tp} does not divide model.vocab_size={model.vocab_size} (vocab-parallel head)")
    if model.hidden_dim % tp:
        raise LayoutError(f"parallel.tp: {tp} does not divide the MLP hidden size {model.hidden_dim}")


def check_layout(cfg: Config, world_size: int) -> int:
    """Raise LayoutError (one line) if the layout cannot run on `world_size` processes; return dp.
    The one owner of the layout rules: config validation checks only that tp/pp/dp are >= 1."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    # first what is wrong on any number of processes: that message names the setting to change
    if p.pp > 1 and p.zero_stage > 1:
        raise LayoutError(f"parallel.zero_stage: got {p.zero_stage} with parallel.pp={p.pp}; "
                          "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
    check_tp_split(m, p.tp)
    if m.n_layers % p.pp:
        raise LayoutError(f"parallel.pp: {p.pp} does not divide model.n_layers={m.n_layers}")
    if p.sequence_parallel and (p.tp == 1 or cfg.data.seq_len % p.tp):
        raise LayoutError(f"parallel.sequence_parallel: needs tp > 1 dividing data.seq_len={cfg.data.seq_len} (tp={p.tp})")
    if p.offload_params and p.zero_stage != 3:
        raise LayoutError(f"parallel.offload_params: needs parallel.zero_stage=3 (got {p.zero_stage})")
    if p.offload_optimizer and p.zero_stage == 0:
        raise LayoutError("parallel.offload_optimizer: needs parallel.zero_stage >= 1")
    if p.pp > 1 and cfg.data.doc_masking:
        raise LayoutError("data.doc_masking: not supported with parallel.pp > 1 (stages pass only hidden states)")
    mp = p.tp * p.pp
    if world_size % mp:
        raise LayoutError(f"parallel.tp x parallel.pp = {p.tp} x {p.pp} = {mp} does not divide the world size {world_size}")
    dp = world_size // mp
    if p.dp is not None and p.dp != dp:
        raise LayoutError(f"parallel.dp: got {p.dp}, but world size {world_size} / (tp {p.tp} x pp {p.pp}) = {dp}")
    glob = t.micro_batch_size * t.grad_accum_steps * dp
    js = _json_batch(cfg)
    if "train_micro_batch_size_per_gpu" in js and js["train_micro_batch_size_per_gpu"] != t.micro_batch_size:
        raise LayoutError(f"parallel.deepspeed_config: train_micro_batch_size_per_gpu={js['train_micro_batch_size_per_gpu']} "
                          f"but train.micro_batch_size={t.micro_batch_size}")
    if "gradient_accumulation_steps" in js and js["gradient_accumulation_steps"] != t.grad_accum_steps:
        raise LayoutError(f"parallel.deepspeed_config: gradient_accumulation_steps={js['gradient_accumulation_steps']} "
                          f"but train.grad_accum_steps={t.grad_accum_steps}")
    if "train_batch_size" in js and js["train_batch_size"] != glob:
        raise LayoutError(f"parallel.deepspeed_config: train_batch_size={js['train_batch_size']} but micro {t.micro_batch_size} "
                          f"x accum {t.grad_accum_steps} x dp {dp} = {glob}")
    return dp


# --- memory estimate ------------------------------------------------------------------------

def param_counts(cfg: Config) -> dict:
    m = cfg.model
    hd = m.head_dim
    attn = m.dim * (m.n_heads * hd) * 2 + m.dim * (m.kv_heads * hd) * 2
    if m.qkv_bias:
        attn += (m.n_heads + 2 * m.kv_heads) * hd
    mlp = 3 * m.dim * m.hidden_dim
    norms = 2 * m.dim
    emb = m.vocab_size * m.dim
    return {"embedding": emb, "layer_sharded": attn + mlp, "layer_replicated": norms,
            "head": 0 if m.tie_embeddings else emb, "final_norm": m.dim}


def per_rank_estimate(cfg: Config, world_size: int) -> dict:
    p, m, t = cfg.parallel, cfg.model, cfg.train
    dp = max(world_size // (p.tp * p.pp), 1)
    c = param_counts(cfg)
    layers = m.n_layers // p.pp
    # the first stage holds the embedding, the last the head; report the heavier one
    first = c["embedding"] / p.tp + layers * (c["layer_sharded"] / p.tp + c["layer_replicated"])
    last = layers * (c["layer_sharded"] / p.tp + c["layer_replicated"]) + c["final_norm"] + (
        (c["head"] or (c["embedding"] if p.pp > 1 else 0)) / p.tp)
    n = max(first, last) if p.pp > 1 else first + last - layers * (c["layer_sharded"] / p.tp + c["layer_replicated"])
    bf16 = cfg.precision == "bf16"
    w_bytes = (2 if bf16 else 4) * n
    master = 4 * n if bf16 else 0
    grads = 4 * n
    optim = 8 * n + master
    if p.zero_stage >= 1:
        optim /= dp
    if p.zero_stage >= 2:
        grads /= dp
    if p.zero_stage >= 3:
        w_bytes /= dp
    if p.offload_optimizer:
        optim = 0
    if p.offload_params:
        w_bytes = 0
    s, b, h = cfg.data.seq_len, t.micro_batch_size, m.dim
    scale = 1 if bf16 else 2
    in_flight = min(p.pp, t.grad_accum_steps) if p.pp > 1 else 1
    sp = p.tp if p.sequence_parallel else 1
    full_layer = s * b * h * (10 / sp + 24 / p.tp) * scale
    act = layers * full_layer * in_flight
    act_ckpt = (layers * s * b * h * 2 * scale / sp) * in_flight + full_layer
    # the fused loss's reused [chunk, V/tp] logits buffer, in the GEMM dtype (0 = the driver's budget)
    v_local, itemsize = m.vocab_size // p.tp, 2 if bf16 else 4
    logits = min(cfg.kernels.loss_chunk_size or loss_chunk_tokens(v_local, itemsize), s * b) * v_local * itemsize
    return {"dp": dp, "params": n, "weights": w_bytes, "grads": grads, "optimizer": optim,
            "activations": act + logits, "activations_ckpt": act_ckpt + logits,
            "total": w_bytes + grads + optim + act + logits, "total_ckpt": w_bytes + grads + optim + act_ckpt + logits}


def available_memory(device: torch.device) -> tuple[float, str]:
    """(bytes this process may use, what they are) on `device`."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), f"{torch.cuda.get_device_name(device)} memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "RAM"


def check_fits(cfg: Config, world_size: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a run whose weights, gradients, optimizer state and
    activations cannot fit in this device's memory (the `llmstack plan` estimate)."""
    est = per_rank_estimate(cfg, world_size)
    need = est["total_ckpt"] if cfg.train.activation_checkpointing else est["total"]
    have, what = available_memory(device)
    if need > have:
        raise LayoutError(
            f"model: needs about {need / 2**30:.1f} GiB per rank ({est['params']:,.0f} parameters: weights "
            f"{est['weights'] / 2**30:.1f} + grads {est['grads'] / 2**30:.1f} + optimizer {est['optimizer'] / 2**30:.1f} + "
            f"activations {(need - est['weights'] - est['grads'] - est['optimizer']) / 2**30:.1f} GiB), "
            f"more than the {have / 2**30:.1f} GiB of {what}; shrink the model or batch, or spread it "
            "with parallel.tp/pp/zero_stage (`llmstack plan` shows the split)")


def format_gib(x: float) -> str:
    return f"{x / 2**30:8.2f} GiB"
