"""Load any model folder the CLI accepts: an llmstack checkpoint, a run folder (its latest
checkpoint), a Hugging Face model folder, or a quantized checkpoint (GPTQ, ours or another
quantizer's, or an earlier llmstack quantized folder)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from llmstack import checkpoint as ckpt
from llmstack.config import Config, from_dict
from llmstack.data import Tokenizer
from llmstack.kernels import resolve_ops
from llmstack.model import Llama


@dataclass
class Pretrained:
    model: Llama
    cfg: Config
    tokenizer: Tokenizer | None
    folder: Path
    kind: str  # "llmstack", "hf" or "quantized"

    @property
    def size_bytes(self) -> int:
        weights = [p for p in self.folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.name.startswith(("model", "quant"))]
        return sum(p.stat().st_size for p in weights)


def is_hf_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_config_of(folder: Path) -> Config:
    path = folder / "config.yaml"
    if not path.exists():
        raise ckpt.CheckpointError(f"{folder}: no config.yaml; not an llmstack checkpoint")
    return from_dict(yaml.safe_load(path.read_text()))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto") -> Pretrained:
    from llmstack.quant import is_quantized_folder, load_quantized
    folder = Path(path)
    if folder.is_dir() and is_quantized_folder(folder):  # GPTQ (an HF folder) or a legacy llmstack one
        return load_quantized(folder, device=device, backend=backend)
    if is_hf_folder(folder):
        from llmstack.hf import load_hf
        return load_hf(folder, device=device, backend=backend)
    folder = ckpt.resolve_checkpoint(folder)
    if is_quantized_folder(folder):
        return load_quantized(folder, device=device, backend=backend)
    if (folder / "manifest.json").exists():
        ckpt.verify(folder)
    cfg = load_config_of(folder)
    if cfg.lora.enabled:  # adapters-only checkpoint: base from init_from + adapters, merged
        from llmstack.lora import load_lora_checkpoint
        return load_lora_checkpoint(folder, device=device, backend=backend)
    device = torch.device(device)
    model = Llama(cfg.model, resolve_ops(backend, device.type))
    ckpt.load_model_state(model, folder / "model.safetensors")
    tok = Tokenizer.load(folder) if (folder / "tokenizer_info.json").exists() or (folder / "tokenizer.json").exists() else None
    return Pretrained(model.to(device).eval(), cfg, tok, folder, "llmstack")
