#!/usr/bin/env python
"""Run a DETR model on images and draw its predictions with Detectron2's ``Visualizer``.

    python tools/predict.py --config-file configs/detr_r50_panoptic.yaml --input photo.jpg \
        --output output/predict MODEL.WEIGHTS /path/to/detr-r50-panoptic-00ce5173.pth
    python tools/predict.py --config-file configs/detr_panoptic_sample.yaml \
        --input datasets/panoptic_sample/val --output output/predict_sample
    python tools/predict.py --config-file configs/detr_face_sample.yaml --input a.png b.png \
        --output output/faces --score-threshold 0.7 \
        MODEL.WEIGHTS output/detr_face_sample/model_final.pth
    python tools/predict.py --config-file configs/detr_face_sample.yaml --input a.png \
        --output output/faces_onnx --backend onnxruntime --exported output/export_faces

``--input`` takes image files and folders (their images, sorted; a progress bar runs over them).
A file that is no readable image (empty, not an image, truncated) is skipped with one line naming
it and why; the others are predicted, the skipped ones listed in OUTPUT/skipped.json, and the exit
status is 1. predictions.json is rewritten every 20 images, so a long run that is stopped keeps
what it predicted.
For each image, OUTPUT/<name>.png shows the panoptic segmentation (models with
``MODEL.DETR.TEST.PANOPTIC_ON``) or the instances scoring at least ``--score-threshold`` (boxes,
and masks with ``MODEL.MASK_ON``); ``--mode`` chooses explicitly. OUTPUT/predictions.json holds,
per image, the drawn instances (xyxy boxes in pixels, scores, classes, RLE masks) or the
panoptic ``segments_info``, whose segment ids are stored in OUTPUT/<name>_panoptic.png (COCO
panoptic format, id = R + 256 G + 256^2 B). Class names are the model's
(``MODEL.DETR.CLASS_NAMES``, the config's datasets, or the layout saved in a detr_d2
checkpoint). Runs on CPU when no GPU is present. Arguments after
the options are config overrides (``KEY VALUE`` pairs).
"""

import argparse
import json
import logging
import os
import sys

import detr_tools.cli as cli  # first: silences Detectron2's import-time jit warning
import numpy as np
import pycocotools.mask as mask_util
from detectron2.config import CfgNode
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image
from tqdm import tqdm

from detr_d2.errors import UserInputError
from detr_d2.export import BACKENDS
from detr_d2.predictor import DetrPredictor, UnreadableImage, list_images

logger = logging.getLogger("detr_d2.predict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, help="a detr_d2 YAML config")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files and/or folders of images"
    )
    parser.add_argument(
        "--output", required=True, help="folder for the drawn PNGs and predictions.json"
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "panoptic", "instances"),
        default="auto",
        help="what to draw (auto: panoptic when the config turns it on, else instances)",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="instances: minimum score drawn and saved (default 0.5)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="size of the drawings relative to the images"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pytorch",
        help="run the PyTorch model, or an export of tools/export_model.py (see --exported)",
    )
    parser.add_argument("--exported", help="export folder for --backend torchscript/onnxruntime")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    cfg = cli.load_config(args.config_file, args.opts)
    if args.mode == "panoptic":
        cfg.MODEL.DETR.TEST.PANOPTIC_ON = True
    elif args.mode == "instances":
        cfg.MODEL.DETR.TEST.INSTANCE_ON = True
    return cfg


def instances_record(instances, threshold: float, names: list[str]) -> dict:
    keep = instances.scores >= threshold
    instances = instances[keep]
    records = []
    for i in range(len(instances)):
        label = int(instances.pred_classes[i])
        record = {
            "category_id": label,
            "category_name": names[label] if label < len(names) else f"class {label}",
            "score": round(float(instances.scores[i]), 5),
            "bbox_xyxy": [round(float(v), 2) for v in instances.pred_boxes.tensor[i]],
        }
        if instances.has("pred_masks"):
            rle = mask_util.encode(
                np.asfortranarray(instances.pred_masks[i].numpy().astype(np.uint8))
            )
            record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        records.append(record)
    return {"instances": records}, instances


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    cfg = setup_cfg(args)
    if args.mode == "panoptic" and not cfg.MODEL.MASK_ON:
        raise UserInputError("--mode panoptic needs a model with masks (MODEL.MASK_ON True).")
    panoptic = args.mode == "panoptic" or (args.mode == "auto" and cfg.MODEL.DETR.TEST.PANOPTIC_ON)
    predictor = DetrPredictor(cfg, backend=args.backend, exported=args.exported)
    metadata, names = predictor.metadata, predictor.class_names
    paths = list_images(args.input)
    os.makedirs(args.output, exist_ok=True)

    results, skipped, used = [], [], set()
    for path in tqdm(paths, desc="predict", unit="image", disable=len(paths) < 2):
        try:
            image = predictor.read_image(path)
        except UnreadableImage as e:
            logger.warning(f"Skipped {e}")
            skipped.append({"file_name": path, "reason": e.reason})
            continue
        output = predictor(image)
        rgb = predictor.to_rgb(image)
        visualizer = Visualizer(rgb, metadata, scale=args.scale, instance_mode=ColorMode.IMAGE)
        stem = os.path.splitext(os.path.basename(path))[0]
        while stem in used:  # same file name in two folders
            stem += "_"
        used.add(stem)
        record = {
            "file_name": path,
            "height": image.shape[0],
            "width": image.shape[1],
            "drawing": f"{stem}.png",
        }
        if panoptic:
            segment_ids, segments_info = output["panoptic_seg"]
            segment_ids = segment_ids.cpu()
            # copies: the Visualizer writes its own "area" into the dicts it gets
            drawn = visualizer.draw_panoptic_seg(
                segment_ids, [dict(info) for info in segments_info]
            )
            ids = segment_ids.numpy().astype(np.int64)
            id_png = np.stack([(ids >> (8 * c)) & 255 for c in range(3)], -1).astype(np.uint8)
            Image.fromarray(id_png).save(os.path.join(args.output, f"{stem}_panoptic.png"))
            record.update(
                panoptic_png=f"{stem}_panoptic.png",
                segments_info=[
                    dict(info, category_name=predictor.class_name(info["category_id"]))
                    for info in segments_info
                ],
            )
        else:
            fields, instances = instances_record(
                output["instances"].to("cpu"), args.score_threshold, names
            )
            drawn = visualizer.draw_instance_predictions(instances)
            record.update(fields)
        drawn.save(os.path.join(args.output, f"{stem}.png"))
        results.append(record)
        if len(results) % WRITE_EVERY == 0:  # a long folder keeps what it has if stopped
            write_results(args.output, results, skipped)

    write_results(args.output, results, skipped)
    logger.info(f"Wrote {len(results)} drawings and predictions.json to {args.output}")
    if skipped:
        logger.warning(
            f"Skipped {len(skipped)} of {len(paths)} files that are no readable images (listed "
            f"in {os.path.join(args.output, 'skipped.json')}); exit status 1."
        )
    return 1 if skipped else 0


WRITE_EVERY = 20  # images between rewrites of predictions.json


def write_results(output: str, results: list[dict], skipped: list[dict]) -> None:
    """predictions.json (and skipped.json when files were skipped), each written to a temporary
    name and renamed, so an interrupted run leaves complete files."""
    files = {"predictions.json": results}
    if skipped:
        files["skipped.json"] = skipped
    for name, content in files.items():
        path = os.path.join(output, name)
        with open(path + ".tmp", "w") as f:
            json.dump(content, f, indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(cli.run(main))
