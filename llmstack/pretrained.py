"""Load any model folder the CLI accepts: an llmstack checkpoint, a run folder (its latest
checkpoint), a Hugging Face model folder, or a quantized checkpoint (GPTQ, ours or another
quantizer's, or an earlier llmstack quantized folder), or a LoRA checkpoint (its base plus the
adapters). Also the model a run starts from (`build_model`: seeded init or `init_from`, then LoRA),
since a LoRA checkpoint is rebuilt the same way."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from llmstack import checkpoint as ckpt
from llmstack.config import Config
from llmstack.data import Tokenizer
from llmstack.folders import Pretrained, is_hf_folder, load_config_of
from llmstack.hf import (HFConversionError, check_compatible, hf_to_llmstack_state, load_hf, model_config_from_hf,
                         read_hf_config, read_hf_tensors)
from llmstack.kernels import resolve_ops
from llmstack.lora import LoraError, apply_lora, load_peft_adapter, merge_lora, peft_base_of
from llmstack.model import Llama
from llmstack.prune.masks import attach_init_masks
from llmstack.quant import dense_state_dict, is_quantized_folder, load_quantized

log = logging.getLogger("llmstack")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto") -> Pretrained:
    """Load and check any model folder: a llmstack folder must verify against its manifest (one
    without a manifest is refused); every kind must hold finite weights."""
    pre = _load_any(Path(path), device, backend)
    bad = ckpt.first_nonfinite(pre.model.state_dict().items())
    if bad is not None:
        raise ckpt.CheckpointError(f"{pre.folder}: tensor {bad} holds NaN or infinite values; "
                                   "use an earlier checkpoint of the run")
    return pre


def _load_any(folder: Path, device, backend: str) -> Pretrained:
    if folder.is_dir() and is_quantized_folder(folder):  # GPTQ (an HF folder) or a legacy llmstack one
        return load_quantized(folder, device=device, backend=backend)
    if is_hf_folder(folder):
        return load_hf(folder, device=device, backend=backend)
    folder = ckpt.resolve_checkpoint(folder)
    ckpt.verify(folder)
    if is_quantized_folder(folder):
        return load_quantized(folder, device=device, backend=backend)
    cfg = load_config_of(folder)
    if cfg.lora.enabled:  # adapters-only checkpoint: base from init_from + adapters, merged
        return load_lora_checkpoint(folder, device=device, backend=backend)
    device = torch.device(device)
    model = Llama(cfg.model, resolve_ops(backend, device.type))
    ckpt.load_model_state(model, folder / "model.safetensors")
    tok = Tokenizer.load(folder) if (folder / "tokenizer_info.json").exists() or (folder / "tokenizer.json").exists() else None
    return Pretrained(model.to(device).eval(), cfg, tok, folder, "llmstack")


def build_model(cfg: Config, device: torch.device, ops, model_class=Llama) -> Llama:
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and layout
    model = model_class(cfg.model, ops)
    model.loss_chunk_size = cfg.kernels.loss_chunk_size
    adapter = None
    if cfg.init_from:
        base, adapter = peft_base_of(cfg.init_from)  # a PEFT adapter folder: its base, then the adapter
        load_weights_into(model, base)
        attach_init_masks(model, cfg, source=base)  # a pruned init_from stays pruned (sparsity.keep_mask)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if adapter is not None:
        load_peft_adapter(model, adapter)  # into the LoRA adapters, or merged into a plain model
    model.activation_checkpointing = cfg.train.activation_checkpointing
    return model.to(device)


def load_weights_into(model: torch.nn.Module, spec: str) -> None:
    """Initialize `model` in place from "hf:PATH", an HF folder, or an llmstack checkpoint/run folder."""
    path = Path(spec[3:] if spec.startswith("hf:") else spec)
    if (path / "config.json").is_file() and "quantization_config" in read_hf_config(path):
        # a GPTQ checkpoint: fine-tune from its dequantized weights
        pre = load_quantized(path)
        check_compatible(model.cfg, pre.cfg.model, f"init_from {path}")
        model.load_state_dict(dense_state_dict(pre.model), strict=not model.cfg.tie_embeddings)
    elif spec.startswith("hf:") or is_hf_folder(path):
        if not path.is_dir():
            raise HFConversionError(f"init_from: {path}: no such HF model folder")
        source = model_config_from_hf(read_hf_config(path), str(path / "config.json"))
        check_compatible(model.cfg, source, f"init_from {path}")
        own = {k: v.shape for k, v in model.state_dict().items()}
        state = hf_to_llmstack_state(read_hf_tensors(path), model.cfg, str(path), own)
        model.load_state_dict(state, strict=not model.cfg.tie_embeddings)
    else:
        folder = ckpt.resolve_checkpoint(path)
        ckpt.verify(folder)
        check_compatible(model.cfg, load_config_of(folder).model, f"init_from {folder}")
        ckpt.load_model_state(model, folder / "model.safetensors")
    log.info("initialized weights from %s", spec)


def lora_model_of_checkpoint(folder: str | Path, backend: str = "auto", device_type: str = "cpu"):
    """(the LoRA model with its adapters, unmerged; its run config) of a LoRA checkpoint."""
    folder = ckpt.resolve_checkpoint(Path(folder))
    ckpt.verify(folder)
    cfg = load_config_of(folder)
    if not cfg.lora.enabled:
        raise LoraError(f"{folder}: not a LoRA checkpoint (lora.enabled is false in its config.yaml)")
    model = build_model(cfg, torch.device("cpu"), resolve_ops(backend, device_type))
    ckpt.load_model_state(model, folder / "model.safetensors")
    return model, cfg, folder


def load_lora_checkpoint(folder: str | Path, device: str = "cpu", backend: str = "auto"):
    """A LoRA run's checkpoint as a merged model (`Pretrained`): base from the run's init_from
    (or seeded init), adapters from the checkpoint."""
    dev = torch.device(device)
    model, cfg, folder = lora_model_of_checkpoint(folder, backend, dev.type)
    merged = merge_lora(model).to(dev).eval()
    tok = Tokenizer.load(folder) if (folder / "tokenizer_info.json").exists() else None
    return Pretrained(merged, cfg, tok, folder, "llmstack")
