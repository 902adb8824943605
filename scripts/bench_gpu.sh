#!/usr/bin/env bash
# One command on a GPU machine: kernel benchmarks + end-to-end 125m/1B train-step benchmark vs
# transformers, all tables written into BENCHMARKS.md with device, date and commit.
#   scripts/bench_gpu.sh            (from the repo root, after `make install TORCH_SPEC=...cuda...`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench_gpu.sh: no CUDA device visible to torch; install a CUDA build (README) and run on a GPU machine")
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
PYEOF
echo "== kernels (attention, matmul, norms/rope/swiglu, fused linear+CE) =="
"$PY" scripts/bench_kernels.py --write
echo "== end-to-end train step, bf16: 125m and 1b, llmstack vs transformers =="
"$PY" scripts/bench_train.py --sizes 125m 1b --batch 4 --seq-len 2048 --repeats 3 --steps 5 --write
echo "== parallel layouts on one device (TP=1 vs ZeRO stages) =="
"$PY" scripts/bench_parallel.py --write
echo "== 2:4 pruned linears on sparse tensor cores vs dense: prefill and decode =="
"$PY" scripts/bench_prune.py --semi-structured --write
echo "BENCHMARKS.md updated ($(git rev-parse --short HEAD), $(date -u +%Y-%m-%dT%H:%MZ))"
