#!/usr/bin/env bash
# Stage two: bash launch/distill.sh RECIPE [--config OVERRIDE.yaml] [--key value ...]
# Runs launch/distill.py under `accelerate launch` with the accelerate config that fits the GPUs
# (MEDKD_ACCELERATE_CONFIG overrides), plain python on a CPU machine. Logs go to the recipe's
# output_dir/distill.log; re-running resumes from the last checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MEDKD_ROOT"
RECIPE="${1:?usage: launch/distill.sh RECIPE [--config OVERRIDE] [--key value ...]}"; shift
OUT="$("$PY" - "$RECIPE" "$@" <<'PYEOF'
import sys
from custom_losses.distill import parse_recipe
print(parse_recipe(["--config", *sys.argv[1:]])[1].output_dir)
PYEOF
)"
mkdir -p "$OUT"
GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
if [[ "$GPUS" -ge 1 ]]; then
  CONFIG="${MEDKD_ACCELERATE_CONFIG:-recipes/accelerate/$([[ "$GPUS" -gt 1 ]] && echo multi-gpu || echo single-gpu).yaml}"
  RUN=("$MEDKD_ROOT/.venv/bin/accelerate" launch --config_file "$CONFIG" --num_processes "$GPUS" launch/distill.py)
else
  RUN=("$PY" launch/distill.py)
fi
echo "[distill] ${RUN[*]} --config $RECIPE $* (log: $OUT/distill.log)" >&2
"${RUN[@]}" --config "$RECIPE" "$@" 2>&1 | tee -a "$OUT/distill.log"
