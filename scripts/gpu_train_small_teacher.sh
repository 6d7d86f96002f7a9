#!/usr/bin/env bash
# On the GPU machine: train the `small` teacher in its two phases (2K tasks, then 16K; ~8 min on one H100),
# run quick dense checks of both, and pack the logs + the exported checkpoint (15 MB parts) under $OUT.
#   scripts/gpu_train_small_teacher.sh        then here: cat $OUT/teacher_small.tar.part_* | tar -xf -
set -uo pipefail
OUT=${OUT:-./outputs/gpu_out}; mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
T0=$(date +%s)
NGPU=1 CONFIG_FILE=train_configs/teacher_small_short.toml timeout 360 ./run_train.sh 2>&1 \
  | grep -v -E "Warning|warn" > "$OUT/logs/phase1.log"
grep -E "step|limit|export" "$OUT/logs/phase1.log" | tail -4; echo "phase 1 done $(( $(date +%s) - T0 )) s"
# the phase-1 model at 2K, in the background beside phase 2
(python3 scripts/eval_long.py --model short=outputs/teacher_small_short/hf_export --lengths 2048 --samples 4 \
   --tasks niah_single,niah_multikey,variable_tracking,qa --device cuda --dtype bf16 --no-progress \
   --out-dir outputs/eval_short > "$OUT/logs/eval_short.log" 2>&1) &
NGPU=1 CONFIG_FILE=train_configs/teacher_small.toml timeout 230 ./run_train.sh 2>&1 \
  | grep -v -E "Warning|warn" > "$OUT/logs/phase2.log"
grep -E "step|limit|export" "$OUT/logs/phase2.log" | tail -3; echo "phase 2 done $(( $(date +%s) - T0 )) s"
wait
tail -8 "$OUT/logs/eval_short.log"
python3 scripts/eval_long.py --model small=outputs/teacher_small/hf_export --lengths 4096,16384 --samples 3 \
   --tasks niah_single,niah_multikey,variable_tracking,qa --device cuda --dtype bf16 --no-progress \
   --out-dir outputs/eval_small > "$OUT/logs/eval_small.log" 2>&1
tail -12 "$OUT/logs/eval_small.log"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
[ -d outputs/teacher_small/hf_export ] && tar -cf - -C outputs/teacher_small hf_export | split -b 15m - "$OUT/teacher_small.tar.part_"
ls -la "$OUT"
