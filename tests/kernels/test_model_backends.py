"""The model trained through the Triton kernels (under the interpreter) follows the torch path."""
import pytest

from llmstack.train import train
from tests.helpers import tiny_config, train_losses
from tests.kernels.conftest import GPU_MODE

if GPU_MODE:
    pytest.skip("these train on CPU through the Triton interpreter (make test); on a GPU the kernel tests and "
                "scripts/bench_train.py cover the model", allow_module_level=True)

# head_dim 64 (a native kernel head dim), short sequences: the interpreter runs every program in Python
SMALL = {"model.dim": 128, "model.n_heads": 2, "model.n_kv_heads": 1, "data.seq_len": 32, "model.max_seq_len": 64,
         "train.micro_batch_size": 2, "train.max_steps": 5, "train.eval_every": 5, "train.eval_batches": 1,
         "checkpoint.every_steps": 100}


@pytest.mark.slow
@pytest.mark.parametrize("doc_masking", [False, True])
def test_five_steps_triton_match_torch(tmp_path, doc_masking):
    extra = {**SMALL, "data.doc_masking": doc_masking}
    ref = train(tiny_config(tmp_path / "torch", **{"kernels.backend": "torch", **extra}))
    tri = train(tiny_config(tmp_path / "triton", **{"kernels.backend": "triton", **extra}))
    assert set(tri["kernels"].values()) == {"triton"} and set(ref["kernels"].values()) == {"torch"}
    a, b = train_losses(tmp_path / "torch"), train_losses(tmp_path / "triton")
    assert sorted(a) == [1, 2, 3, 4, 5]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    assert abs(ref["final_val_loss"] - tri["final_val_loss"]) <= 1e-4 * ref["final_val_loss"]
