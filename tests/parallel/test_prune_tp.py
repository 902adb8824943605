"""Recovery fine-tuning of a pruned checkpoint under distributed layouts: each tensor-parallel rank
keeps its shard of the mask, ZeRO keeps its fp32 master copies masked, a pipeline stage keeps the
masks of its own layers; the checkpoint carries the full mask and consolidates with it."""
import pytest
import torch

from llmstack import checkpoint as ckpt
from llmstack.model import Llama
from llmstack.parallel.consolidate import consolidate
from llmstack.parallel.tensor_parallel import split_dim
from llmstack.prune import prune_model, read_masks, save_pruned
from tests.helpers import tiny_config
from tests.parallel import launch
from tests.parallel.conftest import LAYOUTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    cfg = tiny_config(root / "unused")
    torch.manual_seed(0)
    model = Llama(cfg.model)
    result = prune_model(model, method="magnitude", pattern="2:4")
    return save_pruned(model, cfg, None, root / "2of4", result)


@pytest.mark.parametrize("layout", ["tp2", "zero3_dp2_fused", "pp2"])
def test_finetune_keeps_each_ranks_part_of_the_mask(pruned, layout, tmp_path):
    nproc, extra = LAYOUTS[layout]
    proc = launch.train(nproc, tmp_path / "run", **{**extra, "init_from": str(pruned)})
    assert proc.returncode == 0, launch.tail(tmp_path / "run")
    masks = read_masks(pruned)
    last = ckpt.latest_checkpoint(tmp_path / "run")
    saved = read_masks(last)
    assert sorted(saved) == sorted(masks) and all(torch.equal(saved[k], masks[k]) for k in masks)
    tp = extra.get("parallel.tp", 1)
    pp = extra.get("parallel.pp", 1)
    start = ckpt.load_tensors(pruned / "model.safetensors")
    seen = set()
    for t in range(tp):
        for s in range(pp):
            shard = ckpt.load_tensors(last / "shards" / f"model-tp{t:02d}-pp{s:02d}.safetensors")  # fp32 master values
            for name, keep in masks.items():
                if name not in shard:
                    continue
                dim = split_dim(name)
                local = keep if tp == 1 or dim is None else keep.chunk(tp, dim=dim)[t]
                assert shard[name].shape == local.shape, name
                assert (shard[name][~local] == 0).all(), f"{layout}: {name} (tp rank {t}, stage {s})"
                # a master fragment masked at the wrong offset would zero kept weights
                assert (shard[name][local] != 0).all(), f"{layout}: kept weights of {name} zeroed"
                full = start[name] if tp == 1 or dim is None else start[name].chunk(tp, dim=dim)[t]
                assert not torch.equal(shard[name][local], full[local]), f"{name} did not train"
                seen.add(name)
    assert seen == set(masks)
    single = consolidate(last, tmp_path / "single")
    state = ckpt.load_tensors(single / "model.safetensors")
    assert all((state[k][~m] == 0).all() for k, m in masks.items())
    assert sorted(read_masks(single)) == sorted(masks)
