#!/usr/bin/env bash
# Set up a Python environment with PyTorch, Detectron2 and detr_d2, from package registries only.
#
#   bash d2/install.sh            # creates/updates ./.venv (idempotent, ~2 min the first time)
#   DETR_D2_PYTHON=python bash d2/install.sh   # install into an existing interpreter instead
#
# Detectron2 is not on PyPI under its own name. Its Python code comes from the PyPI
# distribution sal-detectron2 (a cp310 wheel of Detectron2 main, 2024): we take only its
# `detectron2/` package, without the compiled `_C` extension (it cannot load on other Python
# versions; Detectron2 falls back to pure-PyTorch ops, and DETR needs none of them) and
# without the wheel's stray top-level `tools/` package. An already importable Detectron2
# (e.g. one compiled from the official sources) is kept as it is.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
sal_version=0.7.2

if [ -n "${DETR_D2_PYTHON:-}" ]; then
  py=$DETR_D2_PYTHON
else
  venv=${DETR_D2_VENV:-$repo/.venv}
  if [ ! -x "$venv/bin/python" ]; then
    echo "[d2] creating virtual environment $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  py=$venv/bin/python
fi

stamp_dir=$("$py" -c 'import sys; print(sys.prefix)')
stamp=$stamp_dir/.detr_d2_requirements.sha256
want=$(cat "$repo/d2/requirements.txt" "$repo/d2/install.sh" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[d2] installing pinned requirements (d2/requirements.txt)"
  "$py" -m pip install --quiet --disable-pip-version-check -r "$repo/d2/requirements.txt"
  echo "$want" > "$stamp"
fi

# Where each package would be imported from, looked up outside the checkout (so the source folder
# cannot pass for an installed package) and without importing it (importing torch three times made
# this no-op take ~15 s of every run).
in_root() { (cd / && "$py" "$@"); }
where() { in_root -c 'import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
print(os.path.dirname(os.path.dirname(os.path.abspath(spec.origin))) if spec and spec.origin else "")' "$1"; }
detectron2_at=$(where detectron2)
if [ -n "$detectron2_at" ]; then
  echo "[d2] Detectron2 found: $detectron2_at/detectron2"
else
  echo "[d2] installing Detectron2's Python code from sal-detectron2==$sal_version"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" \
    --python-version 3.10 --only-binary=:all: "sal-detectron2==$sal_version"
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -f "$tmp"/detectron2/_C*.so
  cp -r "$tmp/detectron2" "$site/"
  in_root -c 'import detectron2; print("[d2] Detectron2", detectron2.__version__, "installed (no compiled _C)")'
fi

if [ "$(where detr_d2)" != "$repo" ]; then
  echo "[d2] installing detr_d2 (editable)"
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$repo"
fi
