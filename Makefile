# Two commands set everything up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU machines get the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
# On a CUDA machine: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
export HF_DATASETS_OFFLINE=1
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: install train test test-fast bench clean

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
