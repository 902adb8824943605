"""SFT data across layouts: chat conversations with only the assistant tokens trained on, packed,
so every rank and micro-batch holds a different number of target tokens. Each layout's losses and
gradient norms must equal one process's: the step divides by the target tokens of the whole global
batch, not by a per-rank or per-micro-batch count."""
import json

import pytest

from llmstack.config import CONFIGS_DIR, load_config
from llmstack.data.hf import build_hf_data
from tests.parallel import launch
from tests.parallel.conftest import assert_same_curves, curves
from tests.test_hf_data import example_dir

pytestmark = pytest.mark.slow

# pp stages pass only hidden states, so doc masking is off; the loss masks are what matter here
LAYOUTS = {
    "zero1_dp2_accum2": (2, {"parallel.zero_stage": 1, "train.micro_batch_size": 2, "train.grad_accum_steps": 2}),
    "pp2_dp2": (4, {"parallel.pp": 2, "parallel.zero_stage": 1, "train.micro_batch_size": 2,
                    "train.grad_accum_steps": 2}),
}


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    ex = example_dir()
    cache = tmp_path_factory.mktemp("sft_cache")  # tokenized once by the reference, shared by the layouts
    return {"data.source": "hf", "data.format": "chat", "data.paths": json.dumps([str(ex / "chat.jsonl")]),
            "data.tokenizer": "hf", "data.tokenizer_path": str(ex / "tiny-llama"), "data.dir": str(cache),
            "data.doc_masking": False, "data.num_proc": 1, "model.vocab_size": 384}


@pytest.fixture(scope="module")
def sft_reference(sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_reference")
    proc = launch.train(1, out, **sft)
    assert proc.returncode == 0, launch.tail(out)
    return curves(out)


def test_ranks_hold_uneven_target_counts(sft, sft_reference, tmp_path):
    """What makes this test mean something: per-rank micro-batches differ in target tokens."""
    cfg = load_config(CONFIGS_DIR / "tiny.yaml", launch.overrides(tmp_path, **sft, **LAYOUTS["zero1_dp2_accum2"][1]))
    loaders = [build_hf_data(cfg, rank, 2).train for rank in range(2)]
    counts = [[loader.next_batch().n_targets for _ in range(4)] for loader in loaders]
    assert counts[0] != counts[1], counts
    assert len({n for rank in counts for n in rank}) > 2, counts


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sft_layout_matches_single_process(name, sft, sft_reference, tmp_path):
    nproc, extra = LAYOUTS[name]
    proc = launch.train(nproc, tmp_path, **sft, **extra)
    assert proc.returncode == 0, launch.tail(tmp_path)
    assert_same_curves(name, curves(tmp_path), sft_reference)
