"""The DeepSpeed-backed engine: ZeRO 1/2/3, BF16, tensor and pipeline parallelism.

It implements LocalEngine's interface (llmstack/engine.py), so the trainer does not know which
layout runs. Notes on exactness:
- the loss is a token *sum*; the step divides by the target tokens of the whole global batch
  (all micro-batches, all data-parallel ranks: the count is all-reduced), and DeepSpeed's own 1/gas
  scaling is switched off (`scale_wrt_gas=False`) or compensated (pipeline), as per-micro-batch
  means would over-weight short or heavily masked micro-batches;
- DeepSpeed averages gradients over data-parallel ranks, so the loss is multiplied by dp;
- parallel.zero_stage=0 runs as ZeRO-1 (same math; DeepSpeed's overflow check skips non-finite steps);
- under ZeRO-3 the LM-head weight is gathered around the fused loss: it is partitioned (size 0)
  and the fused loss is not the head's forward, so no DeepSpeed hook gathers it.
Checkpoints: DeepSpeed's own files (exact resume) plus plain-named fp32 shards (`shards/`), which
`llmstack checkpoint consolidate` stitches into the single-process format. Pure ZeRO layouts also
keep DeepSpeed's `checkpoints/zero_to_fp32.py` (same weights as consolidate, bit for bit).
"""
from __future__ import annotations

import json
import logging
import math
import types
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from llmstack import checkpoint as ckpt
from llmstack import jsonio
from llmstack.config import Config, deep_merge
from llmstack.engine import StepResult, param_groups
from llmstack.model import Llama
from llmstack.parallel.pipeline import build_pipeline
from llmstack.parallel.sparsity import deepspeed_mask_keeper
from llmstack.parallel.tensor_parallel import apply_tensor_parallel, merge_shards
from llmstack.parallel.topology import current

log = logging.getLogger("llmstack")


_COMM_ERRORS = ("gloo", "nccl", "connection", "timed out", "timeout", "closed", "broken pipe")


def _peer_guard(what: str):
    """A collective that fails because a peer died (or hung past parallel.timeout_s) ends this rank
    with one clear line instead of a backend traceback; the exit status stays non-zero so
    launchers (torchrun --max-restarts, Slurm requeue) restart the job from the latest checkpoint."""
    def wrap(fn):
        def guarded(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except (RuntimeError, dist.DistError) as e:
                text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if not any(w in text.lower() for w in _COMM_ERRORS):
                    raise
                msg = (f"llmstack: rank {self.rank}/{self.world}: lost contact with a peer rank during {what} after "
                       f"{self.steps} steps (a rank died, or hung past parallel.timeout_s={self.cfg.parallel.timeout_s}s): "
                       f"{text[:200]}")
                log.error(msg)
                raise SystemExit(msg) from None
        guarded.__name__, guarded.__doc__ = fn.__name__, fn.__doc__
        return guarded
    return wrap


def deepspeed_config(cfg: Config, dp: int) -> dict:
    """The DeepSpeed JSON generated from the llmstack config, with parallel.deepspeed_config merged over it."""
    p, t, o = cfg.parallel, cfg.train, cfg.optim
    zero = {"stage": max(p.zero_stage, 1)}
    if p.zero_stage in (1, 2):
        zero.update({"contiguous_gradients": True, "overlap_comm": False})
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    conf = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp,
        "gradient_clipping": float(o.grad_clip),
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        # immediate_grad_update: each bf16 gradient moves into its fp32 buffer as soon as autograd
        # accumulates it. Otherwise the pipeline's last stage loses the LM-head gradient: the loss
        # (and so the head) runs outside the module, and DeepSpeed clears bf16 grads when backward
        # reaches the module output - after the head's gradient was already written.
        "bf16": {"enabled": cfg.precision == "bf16", "immediate_grad_update": True},
        # bf16 weights, but gradients accumulate (micro-batches, pipeline) in fp32: summed in bf16
        # they lose the small contributions and training drifts
        **({"data_types": {"grad_accum_dtype": "fp32"}} if cfg.precision == "bf16" else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if p.deepspeed_config:
        with open(p.deepspeed_config) as f:
            conf = deep_merge(conf, json.load(f))
    if p.sequence_parallel and p.pp > 1:
        # DeepSpeed's pipeline sends 1/tp of an activation from each tensor-parallel rank, assuming
        # the ranks hold the same tensor; under sequence parallelism each holds its own slice.
        conf["pipeline"] = {**conf.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    return conf


def _gathered_loss(head: torch.nn.Module) -> None:
    """ZeRO-3 partitions the LM-head weight (size 0) and the fused loss is not the head's forward,
    so no hook gathers it: gather it around the loss."""
    import deepspeed  # deepspeed: slow to import, only distributed layouts need it
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    inner = head.loss

    def loss(self, *args, **kwargs):
        # persistent (small) parameters are never partitioned; gathering them again would free them
        missing = [self.weight] if getattr(self.weight, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE else []
        with deepspeed.zero.GatheredParameters(missing, modifier_rank=None, enabled=bool(missing)):
            return inner(*args, **kwargs)

    head.loss = types.MethodType(loss, head)


class DeepSpeedEngine:
    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, topo):
        import deepspeed
        self.cfg, self.model, self.device, self.topo = cfg, model, device, topo
        self.rank, self.world, self.dp_rank, self.dp_world = topo.rank, topo.world, topo.dp_rank, topo.dp
        self.is_main = topo.rank == 0
        self.steps = 0
        self._full_model = None
        if topo.tp > 1:
            apply_tensor_parallel(model, topo.tp_group, topo.tp_rank, topo.tp, cfg.parallel.sequence_parallel)
        if cfg.parallel.zero_stage == 3:
            _gathered_loss(model.output)
        self.plain_names = {id(p): n for n, p in model.named_parameters()}
        self.ds_config = deepspeed_config(cfg, topo.dp)
        self.pipe_loss = None
        if topo.pp > 1:
            module, self.pipe_loss = build_pipeline(cfg, model, topo)
            mpu = None
        else:
            module, mpu = model, topo
        groups, _ = param_groups(list(module.named_parameters()), cfg.optim.weight_decay)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=groups, config=self.ds_config,
            mpu=mpu, dist_init_required=False)
        self.module = module
        self.sparsity = deepspeed_mask_keeper(model, self._local_params(), topo)  # prune: this rank's part of the masks

    def describe(self) -> str:
        p = self.cfg.parallel
        return (f"deepspeed ZeRO-{p.zero_stage} tp={p.tp}{'+sp' if p.sequence_parallel else ''} pp={p.pp} dp={self.dp_world} "
                f"{self.cfg.precision} on {self.world} x {self.device.type}")

    # --- training ---------------------------------------------------------------------------
    def _global_tokens(self, micro_batches) -> int:
        n = torch.tensor([float(sum(mb.n_targets for mb in micro_batches))], dtype=torch.float64)
        dist.all_reduce(n, group=self.topo.dp_group)
        return int(n.item())

    def _set_lr(self, lr: float) -> None:
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr

    @_peer_guard("a training step")
    def train_step(self, micro_batches, lr: float) -> StepResult:
        n_tokens = self._global_tokens(micro_batches)
        denom = max(n_tokens, 1)
        self._set_lr(lr)
        self.ds.train()
        if self.topo.pp > 1:
            total = self._pipe_step(micro_batches, denom)
        else:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
            scale = self.dp_world / denom
            for mb in micro_batches:
                loss_sum = self.ds(mb.input, mb.target, position_ids=mb.position_ids, doc_ids=mb.doc_ids,
                                   reduction="sum")
                self.ds.backward(loss_sum.float() * scale, scale_wrt_gas=False)
                total += loss_sum.detach().float()
                self.ds.step()
            dist.all_reduce(total, group=self.topo.dp_group)
        self.sparsity.apply()  # prune: pruned weights (and their ZeRO master copies) stay exactly zero
        loss = float(total) / denom
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = bool(self.ds.was_step_applied()) and math.isfinite(loss) and math.isfinite(norm)
        self.steps += 1
        return StepResult(loss, norm, n_tokens, applied)

    def _pipe_sum(self, only_dp0: bool) -> torch.Tensor:
        """Sum of the last stage's recorded loss sums, on every rank."""
        t = self.topo
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        if t.pp_rank == t.pp - 1 and t.tp_rank == 0 and (t.dp_rank == 0 or not only_dp0):
            total += sum(self.pipe_loss.sums, torch.zeros((), device=self.device))
        self.pipe_loss.sums.clear()
        dist.all_reduce(total)
        return total

    def _pipe_step(self, micro_batches, denom: int) -> torch.Tensor:
        # the pipeline engine divides by gas itself and averages over dp: compensate both
        self.pipe_loss.scale = self.dp_world * len(micro_batches) / denom
        self.pipe_loss.sums.clear()
        self.ds.train_batch(data_iter=iter([(mb.input, mb.target) for mb in micro_batches]))
        return self._pipe_sum(only_dp0=False)

    @torch.no_grad()
    @_peer_guard("evaluation")
    def eval_loss(self, batches) -> float:
        self.ds.eval()
        count = sum(b.n_targets for b in batches)
        if self.topo.pp > 1:
            self.pipe_loss.scale = 1.0
            self.pipe_loss.sums.clear()
            self.ds.eval_batch(iter([(b.input.to(self.device), b.target.to(self.device)) for b in batches]),
                               num_micro_batches=len(batches))
            total = self._pipe_sum(only_dp0=True)
        else:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
            for b in batches:
                b = b.to(self.device)
                total += self.ds(b.input, b.target, position_ids=b.position_ids, doc_ids=b.doc_ids,
                                 reduction="sum").float()
            dist.broadcast(total, src=0)  # every rank saw the same batches: report rank 0's, bit for bit
        self.ds.train()
        if self.steps >= self.cfg.train.max_steps and self.cfg.train.sample_tokens > 0:
            self._full_model = self.full_model()
        return float(total) / max(count, 1)

    # --- full weights -------------------------------------------------------------------------
    def _local_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(plain Llama name, parameter) of this rank's stage, in a fixed order."""
        ids = {id(p) for p in self.module.parameters()}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) in ids]

    def plain_shard(self, with_optimizer: bool = False) -> tuple[dict, dict]:
        """This rank's (tp, pp) part in fp32 with plain names and, with_optimizer, its AdamW moments
        as "name::exp_avg" / "name::exp_avg_sq"; collective over data-parallel peers."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        weights, optim = {}, {}
        if with_optimizer and hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            # DeepSpeed links parameters to their optimizer-state slices once, inside the first step of
            # the first parameter group, when later groups have no state yet: link again now
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()
        for name, p in self._local_params():
            full = safe_get_full_fp32_param(p)
            weights[name] = (full if full is not None else p.detach()).float().cpu().contiguous()
            if with_optimizer and self._optimizer_steps() > 0:
                for key in ("exp_avg", "exp_avg_sq"):
                    moment = safe_get_full_optimizer_state(p, key)
                    if moment is None:
                        raise RuntimeError(f"DeepSpeed holds no {key} for {name}; cannot write a consolidatable checkpoint")
                    optim[f"{name}::{key}"] = moment.float().cpu().contiguous().view(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
        return weights, optim

    def full_model(self):
        """A plain single-process Llama with the current weights on rank 0 (collective); None elsewhere."""
        weights, _ = self.plain_shard()
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object(weights if self.dp_rank == 0 else None, gathered, dst=0)
        if not self.is_main:
            return None
        state = {}
        for s in range(self.topo.pp):
            ranks = [self.topo.topo.get_rank(pipe=s, data=0, model=m) for m in range(self.topo.tp)]
            state.update(merge_shards([gathered[r] for r in ranks]))
        full = Llama(self.model.cfg, self.model.ops)
        full.loss_chunk_size = self.model.loss_chunk_size
        full.load_state_dict(state, strict=not self.model.cfg.tie_embeddings)
        return full.to(self.device).eval()

    def eval_model(self):
        p = self.cfg.parallel
        if p.tp == 1 and p.pp == 1 and p.zero_stage < 3:
            return self.model
        if self._full_model is None:
            raise RuntimeError("eval_model: full weights are gathered by the last eval_loss (collective); none yet")
        return self._full_model

    # --- checkpoints --------------------------------------------------------------------------
    @_peer_guard("a checkpoint save")
    def save(self, folder: Path) -> None:
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
        weights, optim = self.plain_shard(with_optimizer=True)
        t = self.topo
        if t.dp_rank == 0:
            shards = folder / "shards"
            shards.mkdir(parents=True, exist_ok=True)
            tag = f"tp{t.tp_rank:02d}-pp{t.pp_rank:02d}"
            save_file(weights, str(shards / f"model-{tag}.safetensors"), metadata={"format": "llmstack-shard"})
            if optim:
                save_file(optim, str(shards / f"optim-{tag}.safetensors"))
        if self.is_main:
            self.sparsity.save(folder)  # prune: the full mask
            layout = {"tp": t.tp, "pp": t.pp, "dp": t.dp, "zero_stage": self.cfg.parallel.zero_stage,
                      "optimizer_steps": self._optimizer_steps(), "tie_embeddings": self.model.cfg.tie_embeddings}
            (folder / "parallel.json").write_text(jsonio.dumps(layout, indent=1))
        # --- DeepSpeed's recovery scripts (zero_to_fp32.py, zero_to_torch.py) -----------------
        # DeepSpeed copies them beside the checkpoints (checkpoints/, whose `latest` names the tag as
        # DeepSpeed's does). They merge data-parallel partitions only, not tensor-parallel shards or
        # pipeline stages: removed under TP/PP (`llmstack checkpoint consolidate` merges those).
        if self.is_main and (t.tp > 1 or t.pp > 1):
            for f in (folder.parent / "zero_to_fp32.py", folder.parent / "zero_to_torch.py"):
                f.unlink(missing_ok=True)

    def _optimizer_steps(self) -> int:
        return int(self.ds.global_steps - self.ds.skipped_steps)

    @_peer_guard("a checkpoint load")
    def load(self, folder: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ckpt.CheckpointError(f"{folder}: no DeepSpeed checkpoint for this layout "
                                  "(consolidate it and resume with tp=pp=1, or use the saving layout)")
        self.steps = int(self.ds.global_steps)
        if self.cfg.sparsity.keep_mask:  # prune: resume restores the mask
            self.sparsity.load(folder)

    # --- collectives ----------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return self.ds.optimizer.param_groups

    def params_finite(self) -> bool:
        """Every rank checks what it holds (its ZeRO-3 partition, its TP/PP shard); all must agree."""
        local = ((n, getattr(p, "ds_tensor", p).detach()) for n, p in self.model.named_parameters())
        return self.all_reduce_max(float(ckpt.first_nonfinite(local) is not None)) == 0.0

    @_peer_guard("a barrier")
    def barrier(self) -> None:
        dist.barrier()

    @_peer_guard("an all-reduce")
    def all_reduce_max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def build_deepspeed_engine(cfg: Config, model: torch.nn.Module, device: torch.device) -> DeepSpeedEngine:
    return DeepSpeedEngine(cfg, model, device, current())
