#!/usr/bin/env python
"""Generate the bundled offline sample face dataset (synthetic cartoon faces, COCO format).

The CPU demo trains DETR from scratch on it, so nothing has to be downloaded. The output is
deterministic (byte-identical for the same arguments) and a second call with the same arguments
returns at once, so scripts may call it every time:

    python tools/make_sample_faces.py                       # -> datasets/face_sample
    python tools/make_sample_faces.py --out datasets/face_sample --num-train 400 --num-val 60 \
        --seed 0 [--force]

Writes OUT/train.json, OUT/val.json (image file names relative to OUT/train and OUT/val),
OUT/train/*.png, OUT/val/*.png and OUT/params.json (the arguments of the completed run).
"""

from __future__ import annotations

import argparse
import logging
import sys

import detr_tools  # noqa: F401  (first: silences Detectron2's import-time jit warning)
from detr_tools.samples.faces import generate_face_dataset

logger = logging.getLogger("make_sample_faces")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the dataset the CPU demo expects)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="datasets/face_sample", help="output folder")
    parser.add_argument("--num-train", type=int, default=400, help="training images")
    parser.add_argument("--num-val", type=int, default=60, help="validation images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate (or skip when up to date) and log a one-line summary per split."""
    logging.basicConfig(level=logging.INFO, format="[make_sample_faces] %(message)s")
    args = parse_args(argv)
    result = generate_face_dataset(
        args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed, force=args.force
    )
    for split in ("train", "val"):
        counts = result[split]
        logger.info(
            "  %-5s %4d images, %4d faces, %3d images without faces",
            split,
            counts["images"],
            counts["faces"],
            counts["empty_images"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
