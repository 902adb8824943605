"""Process groups for tensor x pipeline x data parallelism, built once per process.

Ranks are laid out as DeepSpeed's `PipeModelDataParallelTopology` does (axes pipe, data, model;
model fastest), so tensor-parallel peers share a node and the pipeline engine's own grid agrees
with our groups. `Topology` is both the trainer's `Placement` and the `mpu` object DeepSpeed asks
for (get_model_parallel_* / get_data_parallel_* / get_pipe_parallel_*).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch

from llmstack.config import Config
from llmstack.parallel.plan import LayoutError, check_layout

class Placement:
    """Where this process sits: global rank/world, its data-parallel slice, and its device."""

    def __init__(self, rank=0, world=1, dp_rank=0, dp_world=1, device=None):
        self.rank, self.world, self.dp_rank, self.dp_world = rank, world, dp_rank, dp_world
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT: "Topology | None" = None


def current() -> "Topology":
    if _CURRENT is None:
        raise RuntimeError("llmstack.parallel.topology: init_topology(cfg) has not run in this process")
    return _CURRENT


class Topology(Placement):
    def __init__(self, *, rank, world, tp, pp, dp, device, groups, topo):
        coord = topo.get_coord(rank)
        super().__init__(rank=rank, world=world, dp_rank=coord.data, dp_world=dp, device=device)
        self.tp, self.pp, self.dp, self.topo = tp, pp, dp, topo
        self.tp_rank, self.pp_rank = coord.model, coord.pipe
        self.tp_group, self.dp_group, self.pp_group, self.mp_group = groups

    # --- the mpu interface DeepSpeed reads -------------------------------------------------
    def get_model_parallel_rank(self):
        return self.tp_rank

    def get_model_parallel_world_size(self):
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_pipe_parallel_rank(self):
        return self.pp_rank

    def get_pipe_parallel_world_size(self):
        return self.pp

    def get_pipe_parallel_group(self):
        return self.pp_group

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} (world {self.world}, rank {self.rank}: tp {self.tp_rank}, pp {self.pp_rank}, dp {self.dp_rank})"


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_topology(cfg: Config) -> Topology:
    """Initialise torch.distributed (gloo on CPU, nccl on CUDA) and every group, once."""
    global _CURRENT
    if _CURRENT is not None:
        # process groups are made once per process; a second layout would silently run on the first
        p = cfg.parallel
        if (p.tp, p.pp) != (_CURRENT.tp, _CURRENT.pp) or p.dp not in (None, _CURRENT.dp):
            raise LayoutError(f"parallel: this process already runs tp={_CURRENT.tp} pp={_CURRENT.pp} dp={_CURRENT.dp}; "
                              f"tp={p.tp} pp={p.pp} dp={p.dp} needs a new process")
        return _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_layout(cfg, world)
    if "WORLD_SIZE" not in os.environ:  # one process without a launcher (e.g. ZeRO-1 on one device)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(port))):
            os.environ.setdefault(k, v)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    device = _device()
    import deepspeed  # deepspeed: slow to import, only distributed layouts need it
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    if not torch.distributed.is_initialized() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across restarts (--max-restarts): keys of the previous
        # attempt (dead ranks' addresses) would be read back, so each attempt gets its own prefix
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                           is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore(f"llmstack/attempt_{attempt}", store),
                                             rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)
    # sets up deepspeed.comm (the pipeline module needs it); wraps the process group if it exists
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False,
                               rank=int(os.environ.get("RANK", "0")), world_size=world)
    rank = torch.distributed.get_rank()
    p = cfg.parallel
    topo = PipeModelDataParallelTopology(num_pp=p.pp, num_mp=p.tp, num_dp=dp)

    def group_for(lists):
        mine = None
        for ranks in lists:  # every rank creates every group, in the same order
            g = torch.distributed.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine = g
        return mine

    tp_group = group_for(topo.get_axis_comm_lists("model"))
    dp_group = group_for(topo.get_axis_comm_lists("data"))
    pp_group = group_for(topo.get_axis_comm_lists("pipe"))
    # model-parallel = tensor x pipe peers sharing a data-parallel index
    mp_lists = [topo.filter_match(data=d) for d in range(dp)]
    mp_group = group_for(mp_lists)
    _CURRENT = Topology(rank=rank, world=world, tp=p.tp, pp=p.pp, dp=dp, device=device,
                        groups=(tp_group, dp_group, pp_group, mp_group), topo=topo)
    return _CURRENT
