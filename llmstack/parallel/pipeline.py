"""Pipeline parallelism: a DeepSpeed `PipelineModule` built from the trainer's own model modules.

Stages are [embedding] [block x n_layers] [final norm] (+ the tied embedding again on the last
stage when model.tie_embeddings), partitioned by parameter count; DeepSpeed runs 1F1B. The loss
is the model's own fused LM-head loss (vocab-parallel under TP), computed by the last stage as a
token *sum* scaled to the global-batch token normalisation (so uneven masking across micro-batches
weighs every token equally). The per-stage parameter counts are checked to add up to the model's
and the partition is printed, so a layer silently dropped or duplicated by the split is caught.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger("llmstack")


class EmbeddingPipe(nn.Module):
    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    @property
    def weight(self):  # the tied-weight attribute DeepSpeed synchronises between first and last stage
        return self.embedding.weight

    def forward(self, tokens):
        return self.embedding(tokens)


class BlockPipe(nn.Module):
    def __init__(self, block: nn.Module, model: nn.Module):
        super().__init__()
        self.block = block
        self._rope = (model.rope_cos, model.rope_sin)  # not registered: stays fp32, not a parameter
        self._ops = model.ops

    def forward(self, h):
        return self.block(h, rope=self._rope, ops=self._ops)


class NormHeadPipe(nn.Module):
    """The final norm; holds the LM head too (untied) so its weight lives on the last stage."""

    def __init__(self, norm: nn.Module, ops, head: nn.Module | None):
        super().__init__()
        self.norm = norm
        self.head = head
        self._ops = ops

    def forward(self, h):
        return self.norm(h, self._ops)


def _passthrough(module, h):
    return h


class PipeLoss:
    """loss_fn(outputs, labels) for the last stage: token-sum loss times `scale`; remembers the sums."""

    def __init__(self, model: nn.Module, chunk_size: int):
        self.model, self.chunk_size = model, chunk_size
        self.scale = 1.0
        self.sums: list[torch.Tensor] = []

    def __call__(self, h, targets):
        loss_sum = self.model.output.loss(h, targets, self.model.ops, reduction="sum", chunk_size=self.chunk_size)
        self.sums.append(loss_sum.detach().float())
        return loss_sum.float() * self.scale


def build_pipeline(cfg, model: nn.Module, topo) -> tuple[nn.Module, PipeLoss]:
    from deepspeed.pipe import PipelineModule, TiedLayerSpec
    tied = model.cfg.tie_embeddings
    if tied:
        layers = [TiedLayerSpec("embed", EmbeddingPipe, model.tok_embeddings, tied_weight_attr="weight")]
    else:
        layers = [EmbeddingPipe(model.tok_embeddings)]
    layers += [BlockPipe(b, model) for b in model.layers]
    layers.append(NormHeadPipe(model.norm, model.ops, None if tied else model.output))
    if tied:
        layers.append(TiedLayerSpec("embed", EmbeddingPipe, model.tok_embeddings, forward_fn=_passthrough,
                                    tied_weight_attr="weight"))
    loss = PipeLoss(model, cfg.kernels.loss_chunk_size)
    ckpt_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    pipe = PipelineModule(layers=layers, loss_fn=loss, topology=topo.topo, partition_method="parameters",
                          activation_checkpoint_interval=1 if cfg.train.activation_checkpointing else 0,
                          activation_checkpoint_func=ckpt_fn)
    check_partition(pipe, model, topo)
    return pipe, loss


def _unique_numel(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def check_partition(pipe: nn.Module, model: nn.Module, topo) -> None:
    """Every parameter of the (tensor-parallel shard of the) model sits on exactly one stage."""
    local = list(pipe.parameters())
    tied_ids = {id(model.tok_embeddings.weight)} if model.cfg.tie_embeddings else set()
    counted = [p for p in local if id(p) not in tied_ids or topo.pp_rank == 0]
    mine = torch.tensor([_unique_numel(counted)], dtype=torch.long)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(topo.pp)]
    dist.all_gather(counts, mine, group=topo.pp_group)
    counts = [int(c) for c in counts]
    expected = _unique_numel(model.parameters())
    parts = pipe.parts
    if topo.rank == 0:
        desc = ", ".join(f"stage {s}: layers {parts[s]}-{parts[s + 1] - 1}, {counts[s]:,} params" for s in range(topo.pp))
        log.info("pipeline partition (by parameters, tp shard): %s; total %s", desc, f"{sum(counts):,}")
    if sum(counts) != expected:
        raise RuntimeError(f"pipeline partition holds {sum(counts):,} parameters, the model has {expected:,}: "
                           f"per stage {counts}")
    if any(c == 0 for c in counts):
        raise RuntimeError(f"pipeline partition left a stage without parameters: {counts}")
