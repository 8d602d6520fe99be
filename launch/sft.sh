#!/usr/bin/env bash
# Stage one SFT with Axolotl: preflight, then train; the composed config and the log stay in output_dir.
#   bash launch/sft.sh RECIPE [OVERLAY.yaml ...] [key=value ...] [--run runs/NAME] [--fresh] [--force] [--preflight-only]
#
# RECIPE        recipes/sft/*.yaml (Axolotl config)
# OVERLAY.yaml  merged over it in order, e.g. recipes/sft/overrides/cpu-tiny.yaml for a CPU smoke run
# key=value     Axolotl key overrides (dotted, list items by index: datasets.0.path=...; --key=value works too)
# --run DIR     read DIR/teacher/sft/ and write DIR/sft/ instead of the recipe's runs/stage1
# --fresh       delete old checkpoints and start over; otherwise a re-run resumes from the last
#               checkpoint, and a run that already finished with the same config does nothing
# --force       train even when the memory estimate says it will not fit
#
# Launcher: no GPU -> python -m axolotl.cli.train (CPU); 1 GPU -> accelerate with
# recipes/accelerate/single-gpu.yaml; N GPUs -> Axolotl preprocesses once, then accelerate with
# recipes/accelerate/multi-gpu.yaml --num_processes N (DeepSpeed comes from the recipe's `deepspeed:`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

PREFLIGHT_ONLY=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --preflight-only) PREFLIGHT_ONLY=1 ;;
    *) ARGS+=("$arg") ;;
  esac
done
[[ ${#ARGS[@]} -ge 1 ]] || { echo "usage: bash launch/sft.sh RECIPE [OVERLAY.yaml ...] [key=value ...] [--run DIR] [--fresh] [--force]" >&2; exit 2; }

# Prints CONFIG=, OUTPUT_DIR=, GPUS=, STATUS=, RESUME_FROM= (shell-quoted); one sentence and exit 2 on a problem.
PLAN="$("$PY" -m launch.sft_preflight "${ARGS[@]}")" || exit $?
eval "$PLAN"

if [[ "$STATUS" == done ]]; then
  echo "[sft] $OUTPUT_DIR already holds this run, trained to the end: nothing to do (--fresh to train again)" >&2
  echo "$OUTPUT_DIR"
  exit 0
fi
if [[ "$PREFLIGHT_ONLY" == 1 ]]; then
  echo "[sft] preflight passed: $CONFIG" >&2
  exit 0
fi

cd "$MEDKD_ROOT"
LOG="$OUTPUT_DIR/train.log"
[[ "$STATUS" == resume ]] && echo "[sft] resuming from $RESUME_FROM" | tee -a "$LOG" >&2
echo "[sft] $(date -u +%FT%TZ) training $CONFIG on ${GPUS} GPU(s); log: $LOG" | tee -a "$LOG" >&2
if [[ "$GPUS" -eq 0 ]]; then
  CMD=("$PY" -m axolotl.cli.train "$CONFIG")
elif [[ "$GPUS" -eq 1 ]]; then
  CMD=("$PY" -m accelerate.commands.launch --config_file recipes/accelerate/single-gpu.yaml -m axolotl.cli.train "$CONFIG")
else
  # Tokenise once on this process so N ranks do not race on the prepared-dataset folder.
  "$PY" -m axolotl.cli.preprocess "$CONFIG" 2>&1 | tee -a "$LOG"
  CMD=("$PY" -m accelerate.commands.launch --config_file recipes/accelerate/multi-gpu.yaml --num_processes "$GPUS"
       -m axolotl.cli.train "$CONFIG")
fi
"${CMD[@]}" 2>&1 | tee -a "$LOG"
"$PY" -m launch.sft_preflight --mark-done "$CONFIG" >/dev/null
echo "[sft] $(date -u +%FT%TZ) finished: adapter/model in $OUTPUT_DIR (merge: bash launch/merge.sh $OUTPUT_DIR)" | tee -a "$LOG" >&2
echo "$OUTPUT_DIR"
