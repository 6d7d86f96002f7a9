#!/usr/bin/env bash
# On the GPU machine: the small-teacher pipeline (needs assets/teachers/small, carried), results under $OUT.
# Extra arguments are config overrides for every stage (e.g. --rtpurbo.stage1_target far).
set -uo pipefail
OUT=${OUT:-./outputs/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
NGPU=1 CONFIG_FILE=train_configs/rtpurbo_pipeline_small.toml timeout ${PIPE_TIMEOUT:-560} ./run_train.sh "$@" 2>&1 \
  | grep -v -E "sample/s|Warning|warn" | tee "$OUT/pipeline_small.log" | grep -E "calibration:|validation|stage|Error|\|" | tail -40
cp outputs/rtpurbo_pipeline_small/eval/results.json "$OUT/small_results.json" 2>/dev/null
cp outputs/rtpurbo_pipeline_small/eval/table.txt "$OUT/small_table.md" 2>/dev/null
cp outputs/rtpurbo_pipeline_small/calibration_summary.json "$OUT/small_calibration_summary.json" 2>/dev/null
cp outputs/rtpurbo_pipeline_small/roles_heatmap.png "$OUT/small_roles_heatmap.png" 2>/dev/null
ls -la "$OUT"
