#!/usr/bin/env bash
# The sample run, offline: set up the environment (d2/install.sh, idempotent), generate the sample
# face dataset, train DETR on it from scratch on the CPU and evaluate COCO AP on its val split.
#   bash tools/run_sample.sh [config overrides, e.g. SOLVER.MAX_ITER 500]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/d2/install.sh"
py=${DETR_D2_PYTHON:-${DETR_D2_VENV:-$repo/.venv}/bin/python}
cd "$repo"
"$py" tools/make_sample_faces.py --out datasets/face_sample
exec "$py" tools/train_net.py --config-file configs/detr_face_sample.yaml "$@"
