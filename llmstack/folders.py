"""What a model folder is, below every loader: the loaded-model record (`Pretrained`), whether a
folder is a Hugging Face one, and the run config an llmstack checkpoint carries. hf, lora and
quant build `Pretrained` values; `pretrained.load_pretrained` picks which of them loads a folder."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmstack import checkpoint as ckpt
from llmstack.config import Config, from_dict
from llmstack.data import Tokenizer
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
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ckpt.CheckpointError(f"{path}: not a readable YAML config") from None
    return from_dict(raw)
