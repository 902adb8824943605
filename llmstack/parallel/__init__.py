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
from llmstack.parallel.plan import check_fits, check_layout


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed(cfg: Config) -> bool:
    return world_size() > 1 or cfg.parallel.tp > 1 or cfg.parallel.pp > 1 or cfg.parallel.zero_stage > 0


def build_engine(cfg: Config, model: torch.nn.Module, device: torch.device):
    if not is_distributed(cfg):
        return LocalEngine(cfg, model, device)
    from llmstack.parallel.deepspeed import build_deepspeed_engine
    return build_deepspeed_engine(cfg, model, device)


class Placement:
    """Where this process sits: global rank/world, its data-parallel slice, and its device."""

    def __init__(self, rank=0, world=1, dp_rank=0, dp_world=1, device=None):
        self.rank, self.world, self.dp_rank, self.dp_world = rank, world, dp_rank, dp_world
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(cfg: Config) -> Placement:
    """Initialise process groups once (distributed layouts) and say where this process sits."""
    check_layout(cfg, world_size())  # before any process group exists, on every rank
    if not is_distributed(cfg):
        place = Placement()
    else:
        from llmstack.parallel.topology import init_topology
        place = init_topology(cfg)
    check_fits(cfg, world_size(), place.device)  # before the model is allocated
    return place
