# Sourced by medkd's shell entry points: offline, no telemetry, quiet tokenizers.
# Without these a failing Axolotl run was seen retrying telemetry for over 10 minutes.
# Experiment tracking is the recipes' business (report_to / use_tensorboard / wandb_project): nothing here
# sets WANDB_MODE, so a user's own WANDB_MODE (offline, disabled) and a recipe's W&B project both hold.
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1
MEDKD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MEDKD_ROOT
PY="$MEDKD_ROOT/.venv/bin/python"
