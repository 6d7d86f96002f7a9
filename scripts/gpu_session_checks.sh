#!/usr/bin/env bash
# One GPU call that (1) measures trainer throughput/MFU on a real Qwen3 shape and (2) runs the main job
# (tiny teacher -> calibrate -> stage 1 -> stage 2 -> eval) on CUDA, exercising the FlexAttention paths.
set -uo pipefail
OUT=${OUT:-./outputs/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "=== 1. Qwen3-0.6B shape, random init, stdlib corpus, 30 steps, seq 4096 x 4, bf16 ==="
NGPU=1 CONFIG_FILE=train_configs/debug_model.toml timeout 200 ./run_train.sh \
  --model.flavor 0.6B --training.seq_len 4096 --training.local_batch_size 4 --training.steps 30 \
  --training.document_mask false --lr_scheduler.warmup_steps 5 --optimizer.lr 3e-4 --metrics.log_freq 10 \
  --job.dump_folder outputs/mfu_0.6B 2>&1 | grep -E "INFO|Error" | tee "$OUT/mfu_0.6B.log" | tail -6

echo "=== 2. main job on CUDA ==="
NGPU=1 timeout 330 ./run_train.sh --job.dump_folder outputs/gpu_pipeline 2>&1 \
  | grep -v -E "sample/s|Warning|warn" | tee "$OUT/pipeline.log" | grep -E "INFO|Error|\|" | tail -45
cp outputs/gpu_pipeline/eval/results.json "$OUT/pipeline_results.json" 2>/dev/null
cp outputs/gpu_pipeline/eval/table.md "$OUT/pipeline_table.md" 2>/dev/null
cp outputs/gpu_pipeline/calibration_summary.json "$OUT/" 2>/dev/null
ls -la "$OUT"
