#!/usr/bin/env bash
# The whole pipeline: bash launch/run.sh recipes/pipeline/<one>.yaml [--stages 1|1,2] [--set key=value ...]
# Make-like: re-run the same command after a crash and finished steps are skipped, the rest resume.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MEDKD_ROOT"
RECIPE="${1:?usage: bash launch/run.sh recipes/pipeline/<one>.yaml [--stages 1,2] [--set key=value ...]}"; shift
bash launch/setup.sh
exec "$PY" -m launch.pipeline --config "$RECIPE" "$@"
