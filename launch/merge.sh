#!/usr/bin/env bash
# Merge an SFT run's LoRA adapter into a full bf16 model for vLLM (the adapter stays where it is).
#   bash launch/merge.sh OUTPUT_DIR [--out DIR] [--dtype bfloat16|float32]
# OUTPUT_DIR: the recipe's output_dir, e.g. runs/stage1/sft -> writes runs/stage1/merged.
# Serve the merged model:  recipes/serve/qwen2.5-7b-student-1gpu.yaml with model=runs/stage1/merged
# or the adapter itself:   the base model with lora_modules {student: runs/stage1/sft}, max_lora_rank >= r
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m launch.merge "$@"
