#!/usr/bin/env bash
# Launch llmstack training with the DeepSpeed launcher.
#   one node:    scripts/launch_deepspeed.sh 8 --config configs/recipes/1b.yaml parallel.zero_stage=2
#   multi-node:  HOSTFILE=hostfile scripts/launch_deepspeed.sh 8 --config ...
# A hostfile lists one node per line with its slots (devices), e.g.
#   worker-1 slots=8
#   worker-2 slots=8
# (passwordless ssh between the nodes, the same repository path and venv on each).
set -euo pipefail
NGPUS=${1:?usage: $0 GPUS_PER_NODE [llmstack train args...]}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
DS=${DEEPSPEED:-deepspeed}
[ -x .venv/bin/deepspeed ] && DS=${DEEPSPEED:-.venv/bin/deepspeed}
ARGS=(--num_gpus "$NGPUS" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  ARGS=(--hostfile "$HOSTFILE" --num_gpus "$NGPUS" --master_addr "${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | cut -d' ' -f1)}" --master_port "${MASTER_PORT:-29500}")
fi
# --no_local_rank: ranks read LOCAL_RANK from the environment (as under torchrun)
exec "$DS" "${ARGS[@]}" --no_local_rank --module llmstack train "$@"
