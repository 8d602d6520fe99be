#!/usr/bin/env bash
# The whole pipeline: bash launch/run.sh recipes/pipeline/<one>.yaml [launch.pipeline's flags]
# Make-like: re-run the same command after a crash and finished steps are skipped, the rest resume.
# Builds the environments first (launch/setup.sh); --plan and --print-config run nothing, so they skip the
# setup when the environments are there already.
set -euo pipefail
USAGE="usage: bash launch/run.sh recipes/pipeline/<one>.yaml [--stages 1,2] [--overlay FILE]... [--set key=value]... [--limit N] [--until STEP] [--only STEP,STEP] [--plan] [--print-config]"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MEDKD_ROOT"
case "${1:-}" in
  -h|--help)
    echo "$USAGE"
    echo
    echo "Runs python -m launch.pipeline --config RECIPE with the flags that follow, after building what is missing"
    echo "(launch/setup.sh: .venv, .venv-vllm, the tokenizer). Example: bash launch/run.sh recipes/pipeline/tiny-cpu.yaml --plan"
    if [[ -x "$PY" ]]; then
      echo
      "$PY" -m launch.pipeline --help
    fi
    exit 0 ;;
  "") echo "$USAGE" >&2; exit 2 ;;
  -*) echo "error: the first argument is the pipeline recipe, not $1" >&2; echo "$USAGE" >&2; exit 2 ;;
esac
RECIPE="$1"; shift
SETUP=1
for arg in "$@"; do
  if [[ ( "$arg" == --plan || "$arg" == --print-config ) && -x "$PY" ]]; then SETUP=0; fi
done
if [[ $SETUP == 1 ]]; then bash launch/setup.sh; fi
exec "$PY" -m launch.pipeline --config "$RECIPE" "$@"
