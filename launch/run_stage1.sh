#!/usr/bin/env bash
# Stage one only (teacher -> SFT -> merge -> predict -> score): bash launch/run_stage1.sh RECIPE [--set ...]
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" "${1:?usage: launch/run_stage1.sh recipes/pipeline/<one>.yaml}" --stages 1 "${@:2}"
