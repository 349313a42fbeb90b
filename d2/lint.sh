#!/usr/bin/env bash
# Lint and format check of the whole tree with the ruff pinned in d2/requirements.txt (config:
# ruff.toml). `bash d2/lint.sh --fix` applies the fixes and the formatting instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ruff="${RUFF:-ruff}"
if [[ "${1:-}" == "--fix" ]]; then
    "$ruff" check --fix .
    "$ruff" format .
else
    "$ruff" check .
    "$ruff" format --check .
fi
