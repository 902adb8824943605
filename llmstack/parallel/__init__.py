"""Every torch.distributed / DeepSpeed call lives in this package.

`build_engine(cfg, model, device)` is the one place where the trainer's model is wrapped for
distribution: a single process gets `LocalEngine`; tensor/pipeline parallel and ZeRO layouts get
the DeepSpeed-backed engine from `llmstack.parallel.deepspeed`.
"""
from __future__ import annotations

import os

import torch

from llmstack.config import Config
from llmstack.engine import LocalEngine
from llmstack.parallel.deepspeed import build_deepspeed_engine
from llmstack.parallel.plan import check_fits, check_layout
from llmstack.parallel.topology import Placement, init_topology


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed(cfg: Config) -> bool:
    return world_size() > 1 or cfg.parallel.tp > 1 or cfg.parallel.pp > 1 or cfg.parallel.zero_stage > 0


def build_engine(cfg: Config, model: torch.nn.Module, device: torch.device):
    if not is_distributed(cfg):
        return LocalEngine(cfg, model, device)
    return build_deepspeed_engine(cfg, model, device)


def setup(cfg: Config) -> Placement:
    """Initialise process groups once (distributed layouts) and say where this process sits."""
    check_layout(cfg, world_size())  # before any process group exists, on every rank
    if not is_distributed(cfg):
        place = Placement()
    else:
        place = init_topology(cfg)
    check_fits(cfg, world_size(), place.device)  # before the model is allocated
    return place
