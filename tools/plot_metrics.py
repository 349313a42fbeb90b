#!/usr/bin/env python
"""Plot a training run's curves from Detectron2's ``OUTPUT_DIR/metrics.json``.

    python tools/plot_metrics.py output/detr_face_sample
    python tools/plot_metrics.py output/detr_face_sample/metrics.json --output plots/ --smooth 20

Writes, for the keys the file has: ``losses.png`` (total loss, final decoder layer vs auxiliary
layers), ``loss_terms.png`` (each loss term, final layer and every auxiliary layer), ``lr.png``,
``class_error.png``, ``cardinality_error.png`` and ``eval_<task>.png`` for each evaluation task
(``eval_bbox.png``: AP, AP50, AP75 and AP by size; ``eval_segm.png``; ``eval_panoptic_seg.png``:
PQ, SQ, RQ...). Missing keys skip their picture with a log line. A resumed run repeats
iterations: the later value wins. Default output folder: ``OUTPUT_DIR/plots``.
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import detr_tools  # noqa: F401  (first: silences Detectron2's import-time jit warning)
from detr_tools.metrics_plots import plot_metrics, read_metrics  # noqa: F401  (the tests call both)

logger = logging.getLogger("detr_d2.tools.plot_metrics")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "output_dir", metavar="OUTPUT_DIR", help="a training OUTPUT_DIR, or its metrics.json"
    )
    parser.add_argument(
        "--output", default=None, help="folder for the PNG files (default OUTPUT_DIR/plots)"
    )
    parser.add_argument(
        "--smooth",
        type=int,
        default=1,
        help="moving average over N logged points (default 1: none)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source = Path(args.output_dir)
    metrics_file = source if source.suffix == ".json" else source / "metrics.json"
    output_dir = Path(args.output) if args.output else metrics_file.parent / "plots"
    try:
        written = plot_metrics(metrics_file, output_dir, smooth=max(args.smooth, 1))
    except (FileNotFoundError, ValueError) as e:
        logger.error(str(e))
        return 1
    print(f"Wrote {len(written)} plots to {output_dir}: {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
