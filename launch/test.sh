#!/usr/bin/env bash
# The README's test command: builds what is missing (environments, ranks), then runs the whole suite.
#   bash launch/test.sh [pytest args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$MEDKD_ROOT"
bash launch/setup.sh
# 45 minutes is far above the suite's time on a 2-core CPU; it only guards against a hang.
timeout --signal=INT 2700 "$PY" -m pytest -q -p no:cacheprovider --timeout=900 "$@"
