#!/usr/bin/env python
"""Where a detector's missing AP50 goes: missed objects, duplicates, badly placed and background
boxes (detr_tools.errors), for one or more runs' COCO results on the same ground truth.

    python tools/analyze_errors.py datasets/face_heldout/val.json \\
        output/detr_face_sample/inference/face_heldout/coco_instances_results.json [more.json ...]

Prints one column per results file (a Markdown table). ``--score`` sets the score from which
a detection counts as a prediction for the false-positive and miss counts (default 0.3).
"""

import argparse
import logging
import sys
from collections.abc import Sequence

import detr_tools  # noqa: F401  (first: silences Detectron2's import-time jit warning)
from detr_tools.errors import error_breakdown_from_files

logger = logging.getLogger("detr_d2.tools.analyze_errors")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("gt_json", help="COCO ground truth (instances json)")
    parser.add_argument("results", nargs="+", help="COCO results json files")
    parser.add_argument("--score", type=float, default=0.3, help="prediction score threshold")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        breakdowns = [error_breakdown_from_files(args.gt_json, r, args.score) for r in args.results]
    except (FileNotFoundError, ValueError) as e:
        logger.error(str(e))
        return 1
    print("| | " + " | ".join(args.results) + " |")
    print("|---" * (len(args.results) + 1) + "|")
    for i, (label, _) in enumerate(breakdowns[0].rows()):
        print(f"| {label} | " + " | ".join(b.rows()[i][1] for b in breakdowns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
