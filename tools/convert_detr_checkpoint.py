#!/usr/bin/env python
"""Convert an official DETR checkpoint (.pth of github.com/facebookresearch/detr) to a
Detectron2-format file for detr_d2, and report what was converted.

    python tools/convert_detr_checkpoint.py detr-r50-e632da11.pth detr_r50_d2.pth
    python tools/convert_detr_checkpoint.py detr-r50-e632da11.pth detr_r50_coco80.pth --num-classes 80

`MODEL.WEIGHTS` also accepts the official file directly (it is converted on load); converting once
saves the work at every start and lets you inspect the key table.
"""

import argparse
import logging
import sys

import detr_tools.cli as cli  # first: silences Detectron2's import-time jit warning
import torch
from detectron2.config import get_cfg
from detectron2.data.datasets import builtin  # noqa: F401  (registers the COCO metadata)

from detr_d2 import add_detr_config
from detr_d2.checkpoint import (
    convert_official_state_dict,
    is_official_detr_state_dict,
    safe_torch_load,
)
from detr_d2.data import coco_class_rows
from detr_d2.errors import UserInputError

logger = logging.getLogger("convert_detr_checkpoint")


def class_rows_for(num_classes: int) -> list:
    """Checkpoint rows of Detectron2's contiguous COCO (80) or COCO panoptic (133) classes, from
    Detectron2's builtin metadata; None for other class counts (head kept as it is)."""
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.MODEL.DETR.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ("coco_2017_val_panoptic",) if num_classes == 133 else ("coco_2017_val",)
    return coco_class_rows(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="official DETR .pth file")
    parser.add_argument("output", help="where to write the Detectron2-format .pth")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the target model: default keeps the head as it is (91 for COCO detection, "
        "250 for panoptic checkpoints); 80 remaps a 92-row COCO head to Detectron2's contiguous COCO "
        "ids, 133 a 251-row panoptic head to Detectron2's COCO panoptic classes",
    )
    parser.add_argument("--verbose", action="store_true", help="list every key")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    loaded = safe_torch_load(args.input)
    state_dict = loaded.get("model", loaded)
    if not is_official_detr_state_dict(state_dict):
        raise UserInputError(
            f"{args.input} does not look like an official DETR checkpoint (no backbone.0.body.* keys)."
        )
    head = next(v for k, v in state_dict.items() if k.endswith("class_embed.weight"))
    num_classes = args.num_classes if args.num_classes is not None else head.shape[0] - 1
    class_rows = class_rows_for(num_classes) if head.shape[0] != num_classes + 1 else None
    converted, report = convert_official_state_dict(state_dict, num_classes, class_rows)

    for kind in ("renamed", "kept", "remapped"):
        logger.info(f"{kind}: {len(report[kind])}")
        if args.verbose or kind == "remapped":
            for line in report[kind]:
                logger.info(f"  {line}")
    saved = {"model": converted, "__author__": f"detr_d2 convert_detr_checkpoint from {args.input}"}
    if "args" in loaded:  # the training arguments, checked against the config when loaded
        saved["args"] = loaded["args"]
    torch.save(saved, args.output)
    logger.info(f"wrote {args.output}: {len(converted)} tensors, {num_classes} classes")


if __name__ == "__main__":
    sys.exit(cli.run(main))
