#!/usr/bin/env python
"""Draw what a DETR model looks at: each detection's decoder cross-attention, the encoder
self-attention at a few pixels (DETR paper Fig. 3 and 6), and a one-page summary per image.

    python tools/visualize_attention.py --config-file configs/detr_r50.yaml \
        --weights detr-r50-e632da11.pth --input photo.jpg --output attention/
    python tools/visualize_attention.py --config-file configs/detr_face_sample.yaml \
        --weights output/detr_face_sample/model_final.pth --input datasets/face_sample/val \
        --output attention/ --score-threshold 0.5 --layer -1 --head 2 --points 120,80 40,200
    python tools/visualize_attention.py --config-file configs/detr_face_sample.yaml \
        --random-weights --input img.png --output out/ MODEL.DETR.NHEADS 8

For every image it writes ``<image>_detNN_<class>_<score>_dec-layerL-<avg|headN>.png`` (box
beside the query's cross-attention map), ``<image>_enc_x<X>_y<Y>_layerL.png`` (self-attention of
the token under pixel X, Y of the original image) and ``<image>_summary.png``. Without detections
above ``--score-threshold`` the three best queries are drawn instead, named ``topNN``. Maps are
cut to the real (unpadded) image and resized to it; large images are drawn at most
1024 pixels wide or high. Arguments after the options are config overrides (``KEY VALUE``);
when the last option is ``--input`` or ``--points`` (which take several values), put them after
``--opts``: ``... --points 10,20 --opts INPUT.MIN_SIZE_TEST 600``.
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import detr_tools.cli as cli  # first: silences Detectron2's import-time jit warning
import matplotlib

matplotlib.use("Agg")  # headless: files only

import torch
import tqdm
from detectron2.config import CfgNode

from detr_d2.attention_visualizer import AttentionVisualizer
from detr_d2.predictor import DetrPredictor, UnreadableImage, list_images

logger = logging.getLogger("detr_d2.tools.visualize_attention")


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"a point is 'x,y' in pixels of the original image, got {text!r} (config overrides "
            "after --points go after --opts)"
        ) from error
    return x, y


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="detr_d2 YAML config")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--weights", help="checkpoint: detr_d2/Detectron2 .pth or an official DETR file"
    )
    weights.add_argument(
        "--random-weights",
        action="store_true",
        help="no checkpoint: a randomly initialised model (tests)",
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files and/or folders of images"
    )
    parser.add_argument("--output", required=True, help="folder for the PNG files (created)")
    parser.add_argument(
        "--score-threshold", type=float, default=0.7, help="detections drawn (default 0.7)"
    )
    parser.add_argument(
        "--layer", type=int, default=-1, help="encoder/decoder layer, Python index (default -1)"
    )
    parser.add_argument(
        "--head", type=int, default=None, help="one attention head (default: mean over heads)"
    )
    parser.add_argument(
        "--points",
        nargs="+",
        type=parse_point,
        default=None,
        metavar="X,Y",
        help="encoder reference pixels of the original image (default: centres of the detections, "
        "else a 2x2 grid)",
    )
    parser.add_argument(
        "--max-detections", type=int, default=10, help="at most this many detections per image"
    )
    parser.add_argument(
        "--opts",
        dest="more_opts",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="KEY VALUE",
        help="config overrides, when the last option takes several values (--input, --points)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    cfg = cli.load_config(args.config_file, args.opts + args.more_opts)
    if args.weights:
        cfg.MODEL.WEIGHTS = args.weights
    return cfg


def build_predictor(cfg: CfgNode, args: argparse.Namespace) -> DetrPredictor:
    torch.manual_seed(0)  # --random-weights draws the same model every time
    if args.random_weights:
        logger.warning(
            "--random-weights: the model is randomly initialised; the maps show no learning."
        )
    return DetrPredictor(cfg, load_weights=not args.random_weights)


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.weights and not args.random_weights:
        parser.error(
            "--weights FILE is required (or --random-weights for a randomly initialised model)"
        )
    if args.max_detections < 1:
        parser.error(f"--max-detections must be at least 1, got {args.max_detections}")
    cli.setup_logging()
    cfg = setup_cfg(args)
    try:
        paths = [Path(p) for p in list_images(args.input)]
    except FileNotFoundError as e:
        parser.error(str(e))
    predictor = build_predictor(cfg, args)
    output_dir = Path(args.output)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        visualizer = AttentionVisualizer(
            predictor,
            output_dir,
            score_threshold=args.score_threshold,
            layer=args.layer,
            head=args.head,
            points=args.points,
            max_detections=args.max_detections,
        )
    except ValueError as e:  # --layer or --head out of the model's range
        parser.error(str(e))
    written, failed = [], []
    for path in tqdm.tqdm(paths, desc="attention maps", unit="image", disable=len(paths) < 2):
        try:
            written += visualizer(path)
        except UnreadableImage as e:  # one bad file should not stop a folder's run
            logger.warning(f"Skipped {e}")
            failed.append(path)
    logger.info(
        f"Wrote {len(written)} PNG files for {len(paths) - len(failed)} image(s) to {output_dir}"
    )
    if failed:
        logger.warning(
            f"Skipped {len(failed)} of {len(paths)} files that are no readable images; exit "
            f"status 1."
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
