# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     ?= $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU machines get the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
# On a CUDA machine: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
export HF_DATASETS_OFFLINE=1
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: install train test test-fast bench clean compile-check test-gpu

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[parallel,export,serve,test]"
	touch $@

install: $(VENV)/.installed

# Builds the default corpus on first use, trains the tiny model, prints a sample.
train: install
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/llmstack train --config configs/tiny.yaml $(ARGS)

test: install
	WANDB_MODE=offline OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VENV)/bin/pytest -q $(ARGS)

test-fast: install
	WANDB_MODE=offline $(VENV)/bin/pytest -q -m "not slow" $(ARGS)

bench: install
	$(PY) scripts/bench_train.py --quick

clean:
	rm -rf runs data .cache

# GPU compile gate, full sweep (~1,000 compiles, ~1 h on 2 cores; `make test` runs a subset):
# every kernel for sm_90/sm_80 at the 1B and 8B shapes; resource table into BENCHMARKS.md.
compile-check: install
	TRITON_INTERPRET=0 nice $(PY) scripts/compile_check.py --full --write

# On a GPU machine (no venv needed): every kernel test compiled for the GPU, bf16 included, once
# per autotune config index, so each config a pruner keeps is checked (tests/kernels/conftest.py).
#   PY=python3 PYTHONPATH=. make test-gpu
AUTOTUNE_PASSES := 4
test-gpu:
	for i in $$(seq 0 $$(($(AUTOTUNE_PASSES) - 1))); do \
	  echo "== kernel tests on CUDA, autotune config $$i"; \
	  TRITON_INTERPRET=0 LLMSTACK_AUTOTUNE_CONFIG=$$i LLMSTACK_AUTOTUNE_PASSES=$(AUTOTUNE_PASSES) \
	    $(PY) -m pytest -q tests/kernels -p no:cacheprovider $(ARGS) || exit 1; \
	done
