#!/usr/bin/env python
"""Convert WIDER FACE ground truth to COCO json, so Detectron2 can train and evaluate on it.

    python tools/widerface_to_coco.py \
        --gt wider_face_split/wider_face_train_bbx_gt.txt \
        --images WIDER_train/images --out datasets/widerface/train.json [--skip-missing]

Image sizes are read from the image headers under --images; file names in the json stay
relative to --images. Invalid and empty faces are dropped (counts are logged), images without
faces are kept as negatives, and boxes are clipped to the image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import detr_tools  # noqa: F401  (first: silences Detectron2's import-time jit warning)

from detr_d2.data.widerface import widerface_to_coco

logger = logging.getLogger("widerface_to_coco")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", required=True, help="wider_face_{train,val}_bbx_gt.txt")
    parser.add_argument("--images", required=True, help="image folder, e.g. WIDER_train/images")
    parser.add_argument("--out", required=True, help="COCO json to write")
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip (and count) missing or unreadable images instead of failing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Convert, write the json and log the counts (kept and dropped, per reason)."""
    logging.basicConfig(level=logging.INFO, format="[widerface_to_coco] %(message)s")
    args = parse_args(argv)
    coco, stats = widerface_to_coco(args.gt, args.images, skip_missing=args.skip_missing)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(coco, f)
    logger.info("wrote %s", out)
    for key, value in stats.items():
        logger.info("  %-32s %d", key, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
