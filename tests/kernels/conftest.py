"""Kernel tests run in two modes.

- `make test` (CPU): tests/conftest.py sets TRITON_INTERPRET=1, kernels run under the interpreter.
- `make test-gpu` (a GPU machine, TRITON_INTERPRET=0): tensors made without an explicit device
  land on CUDA (default device), so the same tests run the compiled kernels; tests that pin
  device="cpu" keep checking the CPU refusals. With LLMSTACK_AUTOTUNE_CONFIG=i every autotuned
  kernel runs config i of the list its pruner keeps (instead of the autotuner's pick); the
  Makefile runs the tests once per i in range(LLMSTACK_AUTOTUNE_PASSES), so every config the
  autotuner could pick is checked for correctness, and a kernel with more pickable configs than
  passes fails loudly.
"""
import os
from unittest import mock

import pytest
import torch

GPU_MODE = os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _cuda_default_device():
    if GPU_MODE:
        with torch.device("cuda"):
            yield
    else:
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_autotune_config():
    index = os.environ.get("LLMSTACK_AUTOTUNE_CONFIG")
    if not GPU_MODE or index is None:
        yield
        return
    from triton.runtime.autotuner import Autotuner
    passes = int(os.environ.get("LLMSTACK_AUTOTUNE_PASSES", "0"))
    prune = Autotuner.prune_configs

    def pick(self, kwargs):
        pruned = prune(self, kwargs)
        if passes and len(pruned) > passes:
            raise AssertionError(f"{self.base_fn.__name__}: {len(pruned)} pickable configs but only {passes} "
                                 "test passes (raise LLMSTACK_AUTOTUNE_PASSES in the Makefile)")
        return [pruned[int(index) % len(pruned)]]

    with mock.patch.object(Autotuner, "prune_configs", pick):
        yield
