#!/usr/bin/env bash
# Lint and format check of the whole tree with the ruff pinned in d2/requirements.txt (config:
# ruff.toml), from the environment d2/install.sh made. `bash d2/lint.sh --fix` applies the fixes
# and the formatting instead.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=${DETR_D2_PYTHON:-${DETR_D2_VENV:-$repo/.venv}/bin/python}
ruff=(${RUFF:-"$py" -m ruff})
if [[ "${1:-}" == "--fix" ]]; then
    "${ruff[@]}" check --fix .
    "${ruff[@]}" format .
else
    "${ruff[@]}" check .
    "${ruff[@]}" format --check .
fi
