#!/usr/bin/env bash
# On the GPU machine: train a teacher from its TOML and put the HF export + logs under $OUT.
#   scripts/gpu_train_teacher.sh train_configs/teacher_tiny.toml tiny [extra overrides...]
set -uo pipefail
CONFIG=$1; NAME=$2; shift 2
OUT=${OUT:-./outputs/gpu_out}
mkdir -p "$OUT/$NAME"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
NGPU=1 CONFIG_FILE=$CONFIG timeout ${TRAIN_TIMEOUT:-520} ./run_train.sh --job.dump_folder "./outputs/$NAME" "$@" \
  2>&1 | grep -v -E "Warning|warn" | tee "$OUT/$NAME/train.log" | grep -E "step|INFO|Error|error" | tail -40
cp outputs/$NAME/hf_export/* "$OUT/$NAME/" 2>/dev/null
cp outputs/$NAME/loss_history_pretrain.json "$OUT/$NAME/" 2>/dev/null
ls -la "$OUT/$NAME"
