"""`llmstack checkpoint consolidate SRC DST`: a TP/PP/ZeRO checkpoint -> the single-process format.

SRC is a checkpoint folder (or a run folder: its latest checkpoint) written by the DeepSpeed
engine; its `shards/model-tpXX-ppYY.safetensors` hold fp32 weights with plain Llama names and
`shards/optim-tpXX-ppYY.safetensors` the AdamW moments (ZeRO partitions already gathered). DST is
a complete single-process checkpoint: weights, optimizer, step, data position and RNG of rank 0,
config.yaml with `parallel` reset to one process and the micro-batch widened by the old dp (same
global batch, so the data order continues), tokenizer files and a manifest. `llmstack eval
--checkpoint DST` reads it, `init_from=DST` starts a new run from its weights, and
`train.resume=DST` continues the run with one process where it stopped.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from llmstack import jsonio
from llmstack.outputs import atomic_output_dir, check_destination
from llmstack import checkpoint as ckpt
from llmstack.config import from_dict
from llmstack.engine import build_optimizer
from llmstack.model import Llama
from llmstack.parallel.tensor_parallel import merge_shards
from llmstack.prune.masks import MASK_FILE

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_info.json", "hf_tokenizer")


def _merged(src: Path, layout: dict, prefix: str) -> dict:
    """Full tensors from shards/{prefix}-tpXX-ppYY.safetensors; a tensor two stages hold (a tied
    embedding) must be the same in both."""
    state = {}
    for p in range(layout["pp"]):
        shards = [ckpt.load_tensors(src / "shards" / f"{prefix}-tp{t:02d}-pp{p:02d}.safetensors") for t in range(layout["tp"])]
        names = set(shards[0])
        for t, s in enumerate(shards[1:], 1):
            if set(s) != names:
                raise ckpt.CheckpointError(f"{src}/shards: tp rank {t} of stage {p} holds different tensors than rank 0")
        keys = sorted({k.partition("::")[2] for k in names})  # optimizer shards: "name::exp_avg"
        part = {}
        for key in keys:
            suffix = f"::{key}" if key else ""
            per_rank = [{k[: len(k) - len(suffix)]: v for k, v in s.items() if k.endswith(suffix) and (key or "::" not in k)}
                        for s in shards]
            part.update({n + suffix: v for n, v in merge_shards(per_rank).items()})
        for name in sorted(set(part) & set(state)):
            if not torch.equal(part[name], state[name]):
                raise ckpt.CheckpointError(f"{src}/shards: tensor {name} differs between pipeline stages")
        state.update(part)
    return state


def consolidated_state(src: Path) -> dict:
    layout_file = src / "parallel.json"
    if not layout_file.exists():
        raise ckpt.CheckpointError(f"{src}: no parallel.json; not a checkpoint of a distributed run")
    return _merged(src, ckpt.read_json(layout_file), "model")


def _write_optimizer(src: Path, layout: dict, cfg, model, dst: Path) -> None:
    """optimizer.safetensors/json exactly as a single-process run writes them."""
    moments = _merged(src, layout, "optim")
    optimizer, names = build_optimizer(cfg, list(model.named_parameters()), torch.device("cpu"))
    step = torch.tensor(float(layout["optimizer_steps"]), dtype=torch.float32)
    for i, p in enumerate(q for g in optimizer.param_groups for q in g["params"]):
        name = names[i]
        if f"{name}::exp_avg" not in moments:
            raise ckpt.CheckpointError(f"{src}/shards: no optimizer state for tensor {name}")
        optimizer.state[p] = {"step": step.clone(), "exp_avg": moments[f"{name}::exp_avg"],
                              "exp_avg_sq": moments[f"{name}::exp_avg_sq"]}
    tensors, rest = ckpt.optimizer_tensors(optimizer, names)
    save_file(tensors, str(dst / "optimizer.safetensors"))
    (dst / "optimizer.json").write_text(jsonio.dumps(rest))


def consolidate(src: Path, dst: Path, *, overwrite: bool = False) -> Path:
    check_destination(dst, command="checkpoint consolidate", overwrite=overwrite)
    src = ckpt.resolve_checkpoint(src)
    ckpt.verify(src)
    state = consolidated_state(src)
    layout = ckpt.read_json(src / "parallel.json")
    raw = yaml.safe_load((src / "config.yaml").read_text())
    raw["train"]["micro_batch_size"] = raw["train"].get("micro_batch_size", 8) * layout["dp"]
    raw["parallel"] = {**raw.get("parallel", {}), "tp": 1, "pp": 1, "dp": None, "zero_stage": 0,
                       "sequence_parallel": False, "offload_optimizer": False, "offload_params": False,
                       "deepspeed_config": None}
    cfg = from_dict(raw)
    model = Llama(cfg.model)  # checks every name and shape against the config
    own = model.state_dict()
    for k in own:
        if k not in state and not (k == "output.weight" and cfg.model.tie_embeddings):
            raise ckpt.CheckpointError(f"{src}: consolidated weights miss tensor {k}")
        if k in state and tuple(state[k].shape) != tuple(own[k].shape):
            raise ckpt.CheckpointError(f"{src}: tensor {k} consolidates to {tuple(state[k].shape)}, config expects {tuple(own[k].shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise ckpt.CheckpointError(f"{src}: unexpected tensor {extra[0]}")
    model.load_state_dict(state, strict=not cfg.model.tie_embeddings)
    with atomic_output_dir(dst, command="checkpoint consolidate", overwrite=overwrite) as tmp:
        ckpt.save_model(model, tmp)
        resumable = (src / "trainer_state_rank0.json").exists() and (src / "shards" / "optim-tp00-pp00.safetensors").exists()
        if resumable:
            _write_optimizer(src, layout, cfg, model, tmp)
            shutil.copy2(src / "trainer_state_rank0.json", tmp / "trainer_state.json")
            shutil.copy2(src / "rng_rank0.safetensors", tmp / "rng.safetensors")
        (tmp / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        for name in _TOKENIZER_FILES + (MASK_FILE,):  # prune: the sparsity mask travels with the weights
            f = src / name
            if f.is_dir():
                shutil.copytree(f, tmp / name)
            elif f.exists():
                shutil.copy2(f, tmp / name)
        (tmp / "consolidated_from.json").write_text(jsonio.dumps({"source": str(src), **layout}, indent=1))
    return dst
