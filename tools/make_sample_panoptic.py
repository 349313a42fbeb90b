#!/usr/bin/env python
"""Generate the bundled offline sample panoptic dataset (synthetic scenes, COCO panoptic format).

Things: cartoon faces and balls; stuff: sky, wall, ground. The panoptic CPU demo
(configs/detr_panoptic_sample_stage1.yaml, then configs/detr_panoptic_sample.yaml) trains on it,
so nothing has to be downloaded. The output is deterministic, and a second call with the same
arguments returns at once:

    python tools/make_sample_panoptic.py                     # -> datasets/panoptic_sample
    python tools/make_sample_panoptic.py --out datasets/panoptic_sample --num-train 300 \
        --num-val 40 --seed 0 [--force]

Writes OUT/{train,val}/*.png (images), OUT/panoptic_{train,val}/*.png (panoptic PNGs),
OUT/panoptic_{train,val}.json, OUT/instances_{train,val}.json (things only, RLE masks) and
OUT/params.json.
"""

from __future__ import annotations

import argparse
import logging
import sys

import detr_tools  # noqa: F401  (first: silences Detectron2's import-time jit warning)
from detr_tools.samples.panoptic import generate_panoptic_dataset

logger = logging.getLogger("make_sample_panoptic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the dataset the panoptic CPU demo expects)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="datasets/panoptic_sample", help="output folder")
    parser.add_argument("--num-train", type=int, default=300, help="training images")
    parser.add_argument("--num-val", type=int, default=40, help="validation images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate (or skip when up to date) and log a one-line summary per split."""
    logging.basicConfig(level=logging.INFO, format="[make_sample_panoptic] %(message)s")
    args = parse_args(argv)
    result = generate_panoptic_dataset(
        args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed, force=args.force
    )
    for split in ("train", "val"):
        counts = result[split]
        logger.info(
            "  %-5s %4d images, %4d thing segments, %4d stuff segments",
            split,
            counts["images"],
            counts["things"],
            counts["stuff"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
