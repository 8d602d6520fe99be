#!/usr/bin/env bash
# Both stages, stage one's finished steps skipped (soft labels -> distill -> predict -> score):
#   bash launch/run_stage2.sh RECIPE [--set ...]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" "${1:?usage: launch/run_stage2.sh recipes/pipeline/<one>.yaml}" --stages 1,2 "${@:2}"
