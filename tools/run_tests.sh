#!/usr/bin/env bash
# Set up the environment if needed (d2/install.sh, idempotent), then run the whole test suite.
#   bash tools/run_tests.sh [pytest args]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/d2/install.sh"
py=${DETR_D2_PYTHON:-${DETR_D2_VENV:-$repo/.venv}/bin/python}
cd "$repo"
exec "$py" -m pytest tests "$@"
