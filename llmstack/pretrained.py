"""Load any model folder the CLI accepts: an llmstack checkpoint, a run folder (its latest
checkpoint), a Hugging Face model folder, or a quantized checkpoint (GPTQ, ours or another
quantizer's, or an earlier llmstack quantized folder)."""
from __future__ import annotations

from pathlib import Path

import torch

from llmstack import checkpoint as ckpt
from llmstack.data import Tokenizer
from llmstack.folders import Pretrained, is_hf_folder, load_config_of
from llmstack.kernels import resolve_ops
from llmstack.model import Llama


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
    from llmstack.quant import is_quantized_folder, load_quantized
    if folder.is_dir() and is_quantized_folder(folder):  # GPTQ (an HF folder) or a legacy llmstack one
        return load_quantized(folder, device=device, backend=backend)
    if is_hf_folder(folder):
        from llmstack.hf import load_hf
        return load_hf(folder, device=device, backend=backend)
    folder = ckpt.resolve_checkpoint(folder)
    ckpt.verify(folder)
    if is_quantized_folder(folder):
        return load_quantized(folder, device=device, backend=backend)
    cfg = load_config_of(folder)
    if cfg.lora.enabled:  # adapters-only checkpoint: base from init_from + adapters, merged
        from llmstack.lora import load_lora_checkpoint
        return load_lora_checkpoint(folder, device=device, backend=backend)
    device = torch.device(device)
    model = Llama(cfg.model, resolve_ops(backend, device.type))
    ckpt.load_model_state(model, folder / "model.safetensors")
    tok = Tokenizer.load(folder) if (folder / "tokenizer_info.json").exists() or (folder / "tokenizer.json").exists() else None
    return Pretrained(model.to(device).eval(), cfg, tok, folder, "llmstack")
