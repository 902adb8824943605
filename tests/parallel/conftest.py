import pytest

from tests.helpers import grad_norms, train_losses
from tests.parallel import launch


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The single-process run every layout is compared with (micro-batch 8, fp32)."""
    out = tmp_path_factory.mktemp("reference")
    proc = launch.train(1, out)
    assert proc.returncode == 0, launch.tail(out)
    return curves(out)


def curves(out) -> dict:
    """Per-step loss and gradient norm (before clipping) of a finished run."""
    return {"out": out, "losses": train_losses(out), "grad_norms": grad_norms(out)}


TOL = 1e-5  # measured ~1e-7 (summation order only)


def assert_same_curves(name: str, run: dict, reference: dict) -> None:
    for key in ("losses", "grad_norms"):
        diff = launch.rel_diff(run[key], reference[key])
        print(f"{name}: max relative {key} difference {diff:.2e}")
        assert len(run[key]) == launch.STEPS, (name, key, run[key])
        assert diff <= TOL, f"{name} {key}: {run[key]} vs {reference[key]} (max rel diff {diff:.2e})"


# name -> (processes, overrides); micro-batch 8 per data-parallel group in total, as the reference
LAYOUTS = {
    "tp2": (2, {"parallel.tp": 2}),
    # 1F1B over 2 micro-batches; token-sum normalisation: accum 2 x micro 4 equals accum 1 x micro 8
    "pp2": (2, {"parallel.pp": 2, "train.micro_batch_size": 4, "train.grad_accum_steps": 2}),
    # the same across ranks: dp 2 x accum 2 x micro 2 equals one process with micro 8
    "zero1_dp2": (2, {"parallel.zero_stage": 1, "train.micro_batch_size": 2, "train.grad_accum_steps": 2}),
    "zero2_dp2": (2, {"parallel.zero_stage": 2, "train.micro_batch_size": 4}),
    # the LM head partitioned (persistence threshold 0), several loss chunks: gathered around the fused loss
    "zero3_dp2_fused": (2, {"parallel.zero_stage": 3, "train.micro_batch_size": 4, "kernels.loss_chunk_size": 64,
                            "parallel.deepspeed_config": "configs/deepspeed/zero3.json"}),
    "tp2_dp2": (4, {"parallel.tp": 2, "parallel.zero_stage": 1, "train.micro_batch_size": 4}),
    "pp2_dp2": (4, {"parallel.pp": 2, "parallel.zero_stage": 1, "train.micro_batch_size": 4}),
    "tp2_pp2": (4, {"parallel.tp": 2, "parallel.pp": 2}),
    # norm/residual regions sharded along the sequence: all-gather / reduce-scatter instead of all-reduce
    "tp2_sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    "tp2_pp2_sp": (4, {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}),
}


@pytest.fixture(scope="session")
def layout_run(tmp_path_factory):
    """Run a layout once per session (shared between the loss, consolidate and resume tests)."""
    done = {}

    def run(name):
        if name not in done:
            nproc, extra = LAYOUTS[name]
            out = tmp_path_factory.mktemp(name)
            proc = launch.train(nproc, out, **extra)
            assert proc.returncode == 0, launch.tail(out)
            done[name] = curves(out)
        return done[name]
    return run
