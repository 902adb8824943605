"""LoRA fine-tuning on the plain llmstack model, through `peft`.

Why peft and not our own module: llmstack's projections are ordinary `nn.Linear` modules with
stable names (wq/wk/wv/wo, w1/w2/w3), so `peft.inject_adapter_in_model` wraps them in place and
the model stays an llmstack `Llama` (same forward, KV cache, loss, checkpoint code). We get peft's
tested initialization, scaling (alpha / rank) and dropout without a wrapper class renaming every
parameter. `FeedForward` already falls back to its unfused path for wrapped w1/w3.

Checkpoints hold adapters only. The base weights come from `init_from` (or the seeded random
init), which `train.build_model` loads *before* `apply_lora`; so the model's `state_dict()` is
narrowed to the adapter tensors, and loading such a state tolerates the (already present) base
weights being absent. With that, `LocalEngine.save`/`load` write and resume adapter-only
checkpoints with no change to the trainer. A LoRA checkpoint therefore needs its `init_from` to
stay where it was: `load_lora_checkpoint` rebuilds base + adapters and merges them, and
`llmstack convert --to hf RUN DST` exports the merged model as a full HF checkpoint.

ZeRO-3 partitions parameters; `adapter_state_dict` gathers them before reading (PITFALLS 9).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from llmstack import jsonio
from llmstack.config import LoraConfig
from llmstack.errors import UserError

ADAPTER = "default"


class LoraError(UserError):
    pass


def _is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_lora_model(model: nn.Module) -> bool:
    return bool(getattr(model, "lora_config", None)) and bool(lora_layers(model))


def _keep_adapters_only(module, state_dict, prefix, local_metadata) -> None:
    for k in [k for k in state_dict if not _is_adapter_name(k)]:
        del state_dict[k]


def _base_may_be_absent(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if _is_adapter_name(k)]


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """Wrap the target projections with LoRA adapters in place; only adapter weights stay trainable."""
    import peft
    if is_lora_model(model):
        raise LoraError("apply_lora: the model already has LoRA adapters")
    pcfg = peft.LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                           target_modules=list(lora_cfg.targets), bias="none")
    model = peft.inject_adapter_in_model(pcfg, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter_name(name))
    model.lora_config = lora_cfg
    model.register_state_dict_post_hook(_keep_adapters_only)
    model.register_load_state_dict_post_hook(_base_may_be_absent)
    return model


def _gathered(params: list[torch.Tensor]):
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3 partitioned parameters
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) adapter tensors on CPU, named as in the model."""
    named = [(n, p) for n, p in model.named_parameters() if _is_adapter_name(n)]
    with _gathered([p for _, p in named]):
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}


def save_adapter(model: nn.Module, folder: str | Path, base: str | None = None) -> Path:
    """adapter.safetensors + adapter_config.json (rank, alpha, targets, base model)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(folder / "adapter.safetensors"), metadata={"format": "llmstack-lora"})
    c = model.lora_config
    (folder / "adapter_config.json").write_text(jsonio.dumps(
        {"rank": c.rank, "alpha": c.alpha, "dropout": c.dropout, "targets": list(c.targets), "base": base}, indent=2))
    return folder


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    from llmstack.checkpoint import load_tensors
    tensors = load_tensors(Path(folder) / "adapter.safetensors")
    own = {n for n, _ in model.named_parameters() if _is_adapter_name(n)}
    for k in sorted(own):
        if k not in tensors:
            raise LoraError(f"{folder}: missing adapter tensor {k}")
    extra = sorted(set(tensors) - own)
    if extra:
        raise LoraError(f"{folder}: unexpected adapter tensor {extra[0]}")
    model.load_state_dict(tensors, strict=True)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """A plain llmstack model whose weights are base + scaling * B @ A (the adapters folded in)."""
    from llmstack.model import Llama
    layers = lora_layers(model)
    named = dict(model.named_parameters())
    with _gathered(list(named.values())):
        state = {}
        for n, p in named.items():
            if not _is_adapter_name(n):
                state[n.replace(".base_layer.", ".")] = p.detach().clone()
        for n, m in layers.items():
            state[f"{n}.weight"] += m.get_delta_weight(ADAPTER).to(state[f"{n}.weight"].dtype)
    merged = Llama(model.cfg, model.ops)
    merged.loss_chunk_size = getattr(model, "loss_chunk_size", merged.loss_chunk_size)
    merged.load_state_dict(state, strict=not model.cfg.tie_embeddings)
    return merged.to(next(model.parameters()).device)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return merge_lora(model).state_dict()


def load_lora_checkpoint(folder: str | Path, device: str = "cpu", backend: str = "auto"):
    """A LoRA run's checkpoint as a merged model (`Pretrained`): base from the run's init_from
    (or seeded init), adapters from the checkpoint."""
    from llmstack import checkpoint as ckpt
    from llmstack.data import Tokenizer
    from llmstack.kernels import resolve_ops
    from llmstack.pretrained import Pretrained, load_config_of
    from llmstack.train import build_model
    folder = ckpt.resolve_checkpoint(Path(folder))
    ckpt.verify(folder)
    cfg = load_config_of(folder)
    if not cfg.lora.enabled:
        raise LoraError(f"{folder}: not a LoRA checkpoint (lora.enabled is false in its config.yaml)")
    dev = torch.device(device)
    model = build_model(cfg, torch.device("cpu"), resolve_ops(backend, dev.type))
    ckpt.load_model_state(model, folder / "model.safetensors")
    merged = merge_lora(model).to(dev).eval()
    tok = Tokenizer.load(folder) if (folder / "tokenizer_info.json").exists() else None
    return Pretrained(merged, cfg, tok, folder, "llmstack")
