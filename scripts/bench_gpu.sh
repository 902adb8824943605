#!/usr/bin/env bash
# One command on a GPU machine: kernel benchmarks beside their baselines (attention vs SDPA flash and
# cuDNN, fused linear+CE vs naive and Liger, gate-up vs cuBLAS + epilogue, int8/int4 decode vs bf16,
# norms/rope/swiglu vs eager and torch.compile) and the 1B training step (tokens/s, MFU) vs
# transformers; every table into BENCHMARKS.md with device, date and commit. Each part runs even if
# an earlier one failed; the exit status says whether all succeeded.
#   PY=python3 PYTHONPATH=. scripts/bench_gpu.sh              # kernels + train (~10 min on an H100)
#   PY=python3 PYTHONPATH=. scripts/bench_gpu.sh kernels      # one part: kernels | train | prune | parallel
# The GPU machines hold no deepspeed: the parallel part runs only where it is importable.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(kernels train prune parallel)
"$PY" - <<'PYEOF' || exit 1
import sys, torch, triton
if not torch.cuda.is_available():
    sys.exit("bench_gpu.sh: no CUDA device visible to torch; run on a GPU machine with a CUDA build of torch")
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
PYEOF
status=0
for part in "${PARTS[@]}"; do
  case "$part" in
    kernels)
      echo "== kernels: ours vs SDPA flash/cuDNN, naive/Liger CE, cuBLAS gate-up, bf16 decode =="
      "$PY" scripts/bench_gpu_kernels.py --write || status=1 ;;
    train)
      echo "== train step, bf16: 1B (and 125m), llmstack vs transformers, tokens/s and MFU =="
      "$PY" scripts/bench_train.py --sizes 125m 1b --batch 4 --seq-len 2048 --repeats 3 --steps 5 --write || status=1 ;;
    prune)
      echo "== 2:4 pruned linears on sparse tensor cores vs dense: prefill and decode =="
      "$PY" scripts/bench_prune.py --semi-structured --write || status=1 ;;
    parallel)
      if "$PY" -c "import deepspeed" 2>/dev/null; then
        echo "== parallel layouts on one device =="
        "$PY" scripts/bench_parallel.py --write || status=1
      else
        echo "== parallel layouts skipped: deepspeed is not installed here =="
      fi ;;
    *) echo "bench_gpu.sh: unknown part '$part' (kernels, train, prune, parallel)" >&2; exit 2 ;;
  esac
done
echo "BENCHMARKS.md updated ($(git rev-parse --short HEAD 2>/dev/null || echo no-git), $(date -u +%Y-%m-%dT%H:%MZ))"
exit $status
