#!/usr/bin/env bash
# Launch the trainer with torchrun, TorchTitan style.
#   NGPU=8 CONFIG_FILE=train_configs/debug_model.toml ./run_train.sh --training.steps 50
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node.
# Without CUDA it runs on CPU with gloo (NGPU then means processes).
set -euo pipefail
cd "$(dirname "$0")"

CONFIG_FILE=${CONFIG_FILE:-"./train_configs/rtpurbo_pipeline_tiny.toml"}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
LOG_RANK=${LOG_RANK:-0}
TRAIN_FILE=${TRAIN_FILE:-"torchtitan_rtpurbo.train"}

if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  NGPU=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
else
  NGPU=${NGPU:-1}
  # CPU: keep each process to its share of the cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}
fi

if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR for multi-node runs}"
  MASTER_PORT=${MASTER_PORT:-29500}
  RDZV=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT")
else
  RDZV=(--nnodes 1 --rdzv_backend c10d --rdzv_endpoint "localhost:0")
fi

export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-"expandable_segments:True"}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

exec python3 -m torch.distributed.run --nproc_per_node "$NGPU" "${RDZV[@]}" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m "$TRAIN_FILE" --job.config_file "$CONFIG_FILE" "$@"
