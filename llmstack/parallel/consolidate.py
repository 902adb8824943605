"""`llmstack checkpoint consolidate SRC DST`: a TP/PP/ZeRO checkpoint -> the single-process format.

SRC is a checkpoint folder (or a run folder: its latest checkpoint) written by the DeepSpeed
engine; its `shards/model-tpXX-ppYY.safetensors` hold fp32 weights with plain Llama names (ZeRO
partitions already gathered). DST gets model.safetensors, config.yaml with `parallel` reset to a
single process, the tokenizer files and a manifest, so `llmstack eval --checkpoint DST` reads it
and `init_from=DST` trains from it with tp=1. Optimizer states stay in SRC (DeepSpeed format).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from llmstack import checkpoint as ckpt
from llmstack.parallel.tensor_parallel import merge_shards

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_info.json", "hf_tokenizer")


def consolidated_state(src: Path) -> dict:
    layout_file = src / "parallel.json"
    if not layout_file.exists():
        raise ckpt.CheckpointError(f"{src}: no parallel.json; not a checkpoint of a distributed run")
    layout = ckpt.read_json(layout_file)
    state = {}
    for p in range(layout["pp"]):
        shards = [ckpt.load_tensors(src / "shards" / f"model-tp{t:02d}-pp{p:02d}.safetensors") for t in range(layout["tp"])]
        names = set(shards[0])
        for t, s in enumerate(shards[1:], 1):
            if set(s) != names:
                raise ckpt.CheckpointError(f"{src}/shards: tp rank {t} of stage {p} holds different tensors than rank 0")
        part = merge_shards(shards)
        dup = sorted(set(part) & set(state))
        if dup:
            raise ckpt.CheckpointError(f"{src}/shards: tensor {dup[0]} appears in more than one pipeline stage")
        state.update(part)
    return state


def consolidate(src: Path, dst: Path) -> Path:
    src = ckpt.resolve_checkpoint(src)
    if (src / ckpt.MANIFEST).exists():
        ckpt.verify(src)
    state = consolidated_state(src)
    raw = yaml.safe_load((src / "config.yaml").read_text())
    raw["parallel"] = {**raw.get("parallel", {}), "tp": 1, "pp": 1, "dp": None, "zero_stage": 0,
                       "sequence_parallel": False, "offload_optimizer": False, "offload_params": False,
                       "deepspeed_config": None}
    from llmstack.config import from_dict
    from llmstack.model import Llama
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
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ckpt.save_model(model, tmp)
    (tmp / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for name in _TOKENIZER_FILES:
        f = src / name
        if f.is_dir():
            shutil.copytree(f, tmp / name)
        elif f.exists():
            shutil.copy2(f, tmp / name)
    layout = ckpt.read_json(src / "parallel.json")
    (tmp / "consolidated_from.json").write_text(json.dumps({"source": str(src), **layout}, indent=1))
    ckpt.write_manifest(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def checkpoint_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llmstack checkpoint", description="Checkpoint tools.")
    sub = ap.add_subparsers(dest="action", required=True)
    c = sub.add_parser("consolidate", help="TP/PP/ZeRO checkpoint -> single-process checkpoint")
    c.add_argument("src", help="checkpoint folder or run folder (its latest checkpoint)")
    c.add_argument("dst", help="output folder")
    args = ap.parse_args(argv)
    out = consolidate(Path(args.src), Path(args.dst))
    print(json.dumps({"consolidated": str(out), "from": str(ckpt.resolve_checkpoint(Path(args.src)))}))
    return 0
