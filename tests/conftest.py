"""Test-wide environment: offline everything, Triton kernels decorated for the interpreter.

TRITON_INTERPRET must be set before triton's decorators run (module import), so it is set here,
before any test module imports llmstack. It only matters when a test asks for backend=triton:
`auto` on CPU is the torch path.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter runs every tl.dot as a small numpy matmul; multi-threaded OpenBLAS makes those
# ~100x slower on a busy 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
