#!/usr/bin/env bash
# The README's test command: builds what is missing (environments, ranks), lints, then runs the suite.
#   bash launch/test.sh [--quick] [pytest args]
#   --quick   the fast tier for development (about 2 minutes): no vLLM server, no slow tests, no integration tests
#             (subprocesses of our commands, training steps, Axolotl/accelerate, over ~5 s), no vLLM environment needed;
#             MEDKD_QUICK=1 makes a quick test that starts one of our commands fail (tests/conftest.py)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MEDKD_ROOT"
MARKS=()
if [[ "${1:-}" == --quick ]]; then
  shift
  export MEDKD_SKIP_VLLM=1 MEDKD_QUICK=1
  MARKS=(-m "not vllm and not slow and not integration")
fi
bash launch/setup.sh
"$MEDKD_ROOT/.venv/bin/ruff" check .
# An hour is far above the suite's time on a 2-core CPU; it only guards against a hang.
timeout --signal=INT 3600 "$PY" -m pytest -q -p no:cacheprovider --timeout=900 --durations=25 "${MARKS[@]}" "$@"
