#!/usr/bin/env bash
# Launch llmstack training with torchrun on one node (or several: set NNODES, NODE_RANK, MASTER_ADDR).
#   scripts/launch_torchrun.sh 8 --config configs/model/1b.yaml precision=bf16 parallel.tp=2 parallel.zero_stage=1
# Several nodes: run it on each with NNODES=N NODE_RANK=<0..N-1> MASTER_ADDR=<node 0> (c10d
# rendezvous on MASTER_ADDR:MASTER_PORT; tensor-parallel peers share a node).
# A model file (configs/model/*.yaml) is a whole run config: add data.* keys for your corpus.
# A failed rank makes torchrun stop the others; MAX_RESTARTS>0 restarts the group, and
# train.resume=auto (the default) continues from the latest checkpoint.
set -euo pipefail
NPROC=${1:?usage: $0 NPROC_PER_NODE [llmstack train args...]}; shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
if [ "$NNODES" = 1 ]; then
  RDZV=(--standalone)
else
  RDZV=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT")
fi
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node="$NPROC" --max-restarts="$MAX_RESTARTS" \
  -m llmstack train "$@"
