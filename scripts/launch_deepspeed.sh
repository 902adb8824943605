#!/usr/bin/env bash
# Launch llmstack training with the DeepSpeed launcher.
#   one node:    scripts/launch_deepspeed.sh 8 --config configs/model/1b.yaml precision=bf16 parallel.zero_stage=2
#   multi-node, from node 0 over ssh (DeepSpeed's default pdsh launcher; passwordless ssh, pdsh, the
#   same repository path and venv on every node):
#                HOSTFILE=hostfile scripts/launch_deepspeed.sh 8 --config ...
#   multi-node without ssh: the same command on every node, each with its own NODE_RANK (0..N-1)
#   and node 0's address (deepspeed --no_ssh --node_rank; as torchrun or srun would start them):
#                HOSTFILE=hostfile NODE_RANK=1 MASTER_ADDR=worker-1 scripts/launch_deepspeed.sh 8 --config ...
# A hostfile lists one node per line with its slots (devices); names must differ (DeepSpeed
# refuses a repeated name), and their order sets the ranks:
#   worker-1 slots=8
#   worker-2 slots=8
# A model file (configs/model/*.yaml) is a whole run config: add data.* keys for your corpus.
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
  if [ -n "${NODE_RANK:-}" ]; then
    ARGS+=(--no_ssh --node_rank "$NODE_RANK")
  fi
fi
# --no_local_rank: ranks read LOCAL_RANK from the environment (as under torchrun)
exec "$DS" "${ARGS[@]}" --no_local_rank --module llmstack train "$@"
