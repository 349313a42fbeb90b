#!/usr/bin/env python
"""Export a DETR model to TorchScript or ONNX (in the spirit of Detectron2's
tools/deploy/export_model.py), and optionally evaluate the exported model.

    python tools/export_model.py --config-file configs/detr_r50.yaml --format onnx \
        --output output/export_r50_onnx MODEL.WEIGHTS /path/to/detr-r50-e632da11.pth
    python tools/export_model.py --config-file configs/detr_r50_panoptic.yaml \
        --format torchscript --precision bf16 --output output/export_panoptic_ts \
        --sample-image photo.jpg MODEL.WEIGHTS /path/to/detr-r50-panoptic-00ce5173.pth
    python tools/export_model.py --config-file configs/detr_face_sample.yaml --format onnx \
        --output output/export_faces --run-eval MODEL.WEIGHTS output/detr_face_sample/model_final.pth

The export is the inference model (batch norms folded, no criterion or matcher). Its graph
takes a padded batch of images of any sizes with their sizes, and returns the raw head outputs
and the post-processed detections (and mask logits with MODEL.MASK_ON); OUTPUT/detr_export.json
holds the input format, pixel mean/std, class names and thresholds (see detr_d2/export.py).
``--sample-image`` (default: a noise image of --sample-size) is only traced with: the graph is
not specialised to its size. ``--run-eval`` evaluates the exported model on DATASETS.TEST with
Detectron2's evaluators, through onnxruntime or TorchScript. Arguments after the options are
config overrides (``KEY VALUE`` pairs).
"""

import argparse
import json
import logging
import os
import sys

import detr_tools.cli as cli  # first: silences Detectron2's import-time jit warning
import torch
from detectron2.config import CfgNode

from detr_d2.data import register_datasets_from_cfg
from detr_d2.engine import DetrTrainer, resolve_device
from detr_d2.export import EXPORT_FORMATS, ExportedDetr, export_model
from detr_d2.precision import PRECISIONS
from detr_d2.predictor import DetrPredictor, UnreadableImage

logger = logging.getLogger("detr_d2.export_model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, help="a detr_d2 YAML config")
    parser.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    parser.add_argument("--output", required=True, help="folder for the model and its JSON")
    parser.add_argument("--sample-image", help="image to trace with (test-resized first)")
    parser.add_argument(
        "--sample-size",
        type=int,
        nargs=2,
        default=(480, 640),
        metavar=("H", "W"),
        help="size of the noise image traced without --sample-image",
    )
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="graph precision: fp32; bf16/fp16 for torchscript only",
    )
    parser.add_argument(
        "--run-eval", action="store_true", help="evaluate the exported model on DATASETS.TEST"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    cfg = cli.load_config(args.config_file, args.opts)
    resolve_device(cfg)
    cfg.freeze()
    try:
        register_datasets_from_cfg(cfg)
    except FileNotFoundError as e:
        if args.run_eval:
            raise
        # only the class names come from the datasets; exporting needs none of their files
        logger.warning(
            f"Datasets of the config are not available ({e}); using generic class names."
        )
    return cfg


def sample_image(predictor: DetrPredictor, args: argparse.Namespace) -> tuple[torch.Tensor, bool]:
    """The CHW uint8 image to trace with, in INPUT.FORMAT, test-resized as predict.py does, and
    whether ``--sample-image`` was skipped as unreadable (then a random image of
    ``--sample-size`` is used)."""
    if args.sample_image is not None:
        try:
            return predictor.model_input(predictor.read_image(args.sample_image))["image"], False
        except UnreadableImage as e:
            logger.warning(f"Skipped {e}; tracing with a random image of --sample-size instead.")
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *args.sample_size), generator=generator, dtype=torch.uint8)
    return image, args.sample_image is not None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    cfg = setup_cfg(args)
    predictor = DetrPredictor(cfg)  # the model as every tool loads it (weights, class layout)
    image, skipped = sample_image(predictor, args)
    export_model(predictor.model, cfg, args.format, args.output, image, args.precision)
    if args.run_eval:
        backend = "onnxruntime" if args.format == "onnx" else "torchscript"
        exported = ExportedDetr(args.output, backend, device=cfg.MODEL.DEVICE)
        results = DetrTrainer.test(cfg, exported)
        path = os.path.join(args.output, "eval_results.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=float)
        logger.info(f"Evaluation of the {backend} model written to {path}")
    if skipped:
        logger.warning("Skipped 1 of 1 files that are no readable images; exit status 1.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
