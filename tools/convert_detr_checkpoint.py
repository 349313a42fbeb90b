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

import torch
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import builtin  # noqa: F401  (registers the COCO metadata)

from detr_d2.checkpoint import convert_official_state_dict, is_official_detr_state_dict, safe_torch_load

logger = logging.getLogger("convert_detr_checkpoint")


def coco_rows() -> list:
    """COCO category id of each of Detectron2's 80 contiguous COCO classes."""
    mapping = MetadataCatalog.get("coco_2017_val").thing_dataset_id_to_contiguous_id
    return [dataset_id for dataset_id, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official DETR .pth file")
    parser.add_argument("output", help="where to write the Detectron2-format .pth")
    parser.add_argument(
        "--num-classes", type=int, default=None,
        help="classes of the target model: default keeps the head as it is (91 for COCO detection "
        "checkpoints); 80 remaps the 92-row COCO head to Detectron2's contiguous COCO ids",
    )
    parser.add_argument("--verbose", action="store_true", help="list every key")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    loaded = safe_torch_load(args.input)
    state_dict = loaded.get("model", loaded)
    if not is_official_detr_state_dict(state_dict):
        raise SystemExit(f"{args.input} does not look like an official DETR checkpoint (no backbone.0.body.* keys).")
    head = next(v for k, v in state_dict.items() if k.endswith("class_embed.weight"))
    num_classes = args.num_classes if args.num_classes is not None else head.shape[0] - 1
    class_rows = coco_rows() if num_classes == 80 and head.shape[0] == 92 else None
    converted, report = convert_official_state_dict(state_dict, num_classes, class_rows)

    for kind in ("renamed", "kept", "remapped"):
        logger.info(f"{kind}: {len(report[kind])}")
        if args.verbose or kind == "remapped":
            for line in report[kind]:
                logger.info(f"  {line}")
    torch.save({"model": converted, "__author__": f"detr_d2 convert_detr_checkpoint from {args.input}"}, args.output)
    logger.info(f"wrote {args.output}: {len(converted)} tensors, {num_classes} classes")


if __name__ == "__main__":
    main()
