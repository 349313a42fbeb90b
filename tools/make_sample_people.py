#!/usr/bin/env python
"""Generate the synthetic "people" pretraining dataset (cartoon people and objects, COCO format).

A stand-in for COCO, with COCO's category names and ids (person, car, umbrella, sports ball,
kite, cup): a small DETR is pretrained on it and then fine-tuned on the sample face dataset
(tools/make_sample_faces.py), offline. The output is deterministic (byte-identical for the same
arguments) and a second call with the same arguments returns at once, so scripts may call it
every time:

    python tools/make_sample_people.py                      # -> datasets/people_sample
    python tools/make_sample_people.py --out datasets/people_sample --num-train 2000 \
        --num-val 200 --seed 0 [--force]

Writes OUT/train.json, OUT/val.json (image file names relative to OUT/train and OUT/val),
OUT/train/*.png, OUT/val/*.png and OUT/params.json (the arguments of the completed run).
"""

from __future__ import annotations

import argparse
import logging
import sys

import detr_tools  # noqa: F401  (first: silences Detectron2's import-time jit warning)
from detr_tools.samples.people import CATEGORIES, generate_people_dataset

logger = logging.getLogger("make_sample_people")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the dataset the pretraining configs expect)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="datasets/people_sample", help="output folder")
    parser.add_argument("--num-train", type=int, default=2000, help="training images")
    parser.add_argument("--num-val", type=int, default=200, help="validation images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate (or skip when up to date) and log a one-line summary per split."""
    logging.basicConfig(level=logging.INFO, format="[make_sample_people] %(message)s")
    args = parse_args(argv)
    result = generate_people_dataset(
        args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed, force=args.force
    )
    for split in ("train", "val"):
        counts = result[split]
        per_class = ", ".join(f"{c['name']} {counts[c['name']]}" for c in CATEGORIES)
        logger.info(
            "  %-5s %4d images, %5d instances (%s), %3d images without objects",
            split,
            counts["images"],
            counts["instances"],
            per_class,
            counts["empty_images"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
