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
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # headless: files only

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from PIL import Image  # noqa: E402

from detr_d2 import add_detr_config  # noqa: E402
from detr_d2.attention import attention_to_image, capture_attention, point_to_token  # noqa: E402
from detr_d2.data import register_datasets_from_cfg  # noqa: E402
from detr_d2.data.augmentation import build_detr_augmentation  # noqa: E402
from detr_d2.engine import build_checkpointer, resolve_device  # noqa: E402
from detr_d2.modeling.postprocessing import detection_inference  # noqa: E402
from detr_d2.visualization import (  # noqa: E402
    Detection,
    EncoderPoint,
    decoder_attention_figure,
    encoder_attention_figure,
    summary_figure,
)

logger = logging.getLogger("detr_d2.tools.visualize_attention")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_DISPLAY_SIDE = 1024  # larger images are drawn smaller: the maps have ~1/32 resolution anyway
FALLBACK_QUERIES = 3
MAX_AUTO_POINTS = 4


def parse_point(text: str) -> Tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a point is 'x,y' in pixels of the original image, got {text!r} (config overrides "
            "after --points go after --opts)"
        )
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
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts + args.more_opts)
    if args.weights:
        cfg.MODEL.WEIGHTS = args.weights
    resolve_device(cfg)
    cfg.freeze()
    return cfg


def list_images(inputs: Sequence[str]) -> List[Path]:
    """Files as given, folders expanded to their images (sorted); missing paths are errors."""
    paths: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                logger.warning(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    return paths


def class_names(cfg: CfgNode) -> List[str]:
    """Class names of the model's outputs: the test dataset's (things, or things + stuff for
    panoptic data), COCO's by category id for the official 91- and 250-class heads, else
    ``class<i>``."""
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    try:
        register_datasets_from_cfg(cfg)
    except (FileNotFoundError, ValueError) as e:  # names are a nicety: draw with numbers instead
        logger.warning(f"Datasets of the config not registered ({e}); classes will be numbered.")
    for name in cfg.DATASETS.TEST:
        meta = MetadataCatalog.get(name)
        if not meta.get("thing_classes") and name in DatasetCatalog.list():
            try:
                DatasetCatalog.get(name)  # COCO-json datasets set thing_classes when loaded
            except (OSError, ValueError, KeyError) as e:
                logger.warning(f"Could not load dataset {name!r} for its class names: {e}")
        for key in ("thing_classes", "stuff_classes"):
            names = meta.get(key)
            if names and len(names) == num_classes:
                return list(names)
    names = [f"class{i}" for i in range(num_classes)]
    if num_classes in (91, 250):  # official COCO heads: logit i is COCO (panoptic) category id i
        for category in COCO_CATEGORIES:
            if category["id"] < num_classes:
                names[category["id"]] = category["name"]
    return names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


def _resolve_index(index: int, count: int, what: str) -> int:
    if not -count <= index < count:
        raise ValueError(
            f"{what} {index} is out of range: the model has {count} (use 0..{count - 1} or -1)."
        )
    return index % count


class AttentionVisualizer:
    """Runs one image at a time through the model with attention capture and writes its figures."""

    def __init__(
        self,
        cfg: CfgNode,
        model: torch.nn.Module,
        output_dir: Path,
        *,
        score_threshold: float,
        layer: int,
        head: Optional[int],
        points: Optional[Sequence[Tuple[float, float]]],
        max_detections: int,
        names: Sequence[str],
    ):
        transformer = model.transformer
        self.model = model
        self.cfg = cfg
        self.output_dir = output_dir
        self.score_threshold = score_threshold
        self.encoder_layer = _resolve_index(
            layer, len(transformer.encoder.layers), "--layer (encoder layers)"
        )
        self.decoder_layer = _resolve_index(
            layer, len(transformer.decoder.layers), "--layer (decoder layers)"
        )
        self.head = (
            None
            if head is None
            else _resolve_index(head, transformer.nhead, "--head (attention heads)")
        )
        self.head_tag = "avg" if head is None else f"head{self.head}"
        self.head_text = "mean of heads" if head is None else f"head {self.head}"
        self.points = list(points) if points else None
        self.max_detections = max_detections
        self.names = list(names)
        self.augmentations = T.AugmentationList(build_detr_augmentation(cfg, is_train=False))
        self._stems: Dict[str, int] = {}

    def _stem(self, path: Path) -> str:
        """The file-name prefix of an image; numbered when two inputs share a name."""
        stem = _slug(path.stem)
        self._stems[stem] = self._stems.get(stem, 0) + 1
        return stem if self._stems[stem] == 1 else f"{stem}-{self._stems[stem]}"

    def _select(self, result, stem: str) -> List[Detection]:
        """Queries above the score threshold, best first; else the best few, named ``topNN``."""
        scores, labels, boxes = result.scores, result.pred_classes, result.pred_boxes.tensor
        order = torch.argsort(scores, descending=True)
        kept = [int(q) for q in order if scores[q] > self.score_threshold][: self.max_detections]
        prefix = "det"
        if not kept:
            kept = [int(q) for q in order[:FALLBACK_QUERIES]]
            prefix = "top"
            logger.info(
                f"{stem}: no detection above score threshold {self.score_threshold} (best "
                f"{scores.max().item():.3f}); drawing the top-{len(kept)} scoring queries instead."
            )
        detections = []
        for i, q in enumerate(kept):
            name = self._name(int(labels[q]))
            box = tuple(boxes[q].tolist())
            detections.append(Detection(q, name, float(scores[q]), box, f"{prefix}{i:02d}"))
        return detections

    def _name(self, label: int) -> str:
        return self.names[label] if label < len(self.names) else f"class{label}"

    def __call__(self, path: Path) -> List[Path]:
        """Write the figures of one image; returns the files written."""
        stem = self._stem(path)
        original = utils.read_image(str(path), format=self.cfg.INPUT.FORMAT)
        height, width = original.shape[:2]
        aug_input = T.AugInput(original)
        self.augmentations(aug_input)  # the test resize, as DetrDatasetMapper(is_train=False)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        inputs = [{"image": image, "height": height, "width": width}]
        with capture_attention(self.model) as attention:
            raw = self.model.predict_raw(inputs)
        images = self.model.preprocess_image(inputs)  # the sizes the model saw: real and padded
        image_size, padded_size = tuple(images.image_sizes[0]), tuple(images.tensor.shape[-2:])
        mask = attention.padding_mask[0].cpu()

        # figures show the original image, at most MAX_DISPLAY_SIDE pixels wide or high
        scale = min(1.0, MAX_DISPLAY_SIDE / max(height, width))
        shown_size = (max(round(height * scale), 1), max(round(width * scale), 1))
        rgb = utils.convert_image_to_rgb(original, self.cfg.INPUT.FORMAT)
        if scale < 1.0:
            rgb = Image.fromarray(rgb).resize((shown_size[1], shown_size[0]), Image.BILINEAR)
            rgb = np.asarray(rgb)

        def to_image(feature_map: torch.Tensor) -> np.ndarray:
            heat = attention_to_image(feature_map.cpu(), mask, image_size, padded_size, shown_size)
            return heat.numpy()

        logits, boxes = raw["pred_logits"], raw["pred_boxes"]
        detections = self._select(
            detection_inference(logits, boxes, [shown_size])[0].to("cpu"), stem
        )
        decoder_heats = [
            to_image(attention.decoder_map(0, d.query, self.decoder_layer, self.head))
            for d in detections
        ]
        found = [d for d in detections if d.name.startswith("det")]
        points, encoder_heats = [], []
        for x, y in self.points or self._auto_points(found, scale, (height, width)):
            if not (0 <= x < width and 0 <= y < height):
                logger.warning(f"{stem}: point ({x}, {y}) is outside the {width}x{height} image.")
                continue
            token, _, _ = point_to_token((x, y), mask, image_size, padded_size, (height, width))
            points.append(EncoderPoint(x * scale, y * scale, f"x{round(x)}_y{round(y)}", token))
            encoder_heats.append(
                to_image(attention.encoder_map(0, token, self.encoder_layer, self.head))
            )

        feature_text = "{}x{} feature map".format(*attention.feature_size)
        written = []
        for detection, heat in zip(detections, decoder_heats):
            title = f"{stem}: decoder layer {self.decoder_layer} ({self.head_text}), {feature_text}"
            if detection not in found:
                title += f", below threshold {self.score_threshold}"
            fig = decoder_attention_figure(rgb, heat, detection, title)
            what = f"{detection.name}_{_slug(detection.label)}_{detection.score:.2f}"
            written.append(
                self._save(fig, f"{stem}_{what}_dec-layer{self.decoder_layer}-{self.head_tag}.png")
            )
        head_suffix = "" if self.head is None else f"-head{self.head}"
        for point, heat in zip(points, encoder_heats):
            row, column = divmod(point.token, attention.feature_size[1])
            title = (
                f"{stem}: encoder layer {self.encoder_layer} self-attention ({self.head_text})\n"
                f"at {point.name.replace('_', ' ')}: token (row {row}, col {column}) of the "
                f"{feature_text}"
            )
            fig = encoder_attention_figure(rgb, heat, point, title)
            name = f"{stem}_enc_{point.name}_layer{self.encoder_layer}{head_suffix}.png"
            written.append(self._save(fig, name))
        kind = "detections" if found else "top queries (below threshold)"
        title = (
            f"{stem}: {len(detections)} {kind}; decoder layer {self.decoder_layer}, "
            f"encoder layer {self.encoder_layer}, {self.head_text}"
        )
        fig = summary_figure(rgb, detections, decoder_heats, points, encoder_heats, title)
        written.append(self._save(fig, f"{stem}_summary.png"))
        return written

    @staticmethod
    def _auto_points(
        detections: Sequence[Detection], scale: float, size: Tuple[int, int]
    ) -> List[Tuple[float, float]]:
        """Centres of the best detections (original pixels), else a 2x2 grid over the image."""
        points: List[Tuple[float, float]] = []
        for detection in detections[:MAX_AUTO_POINTS]:
            x0, y0, x1, y1 = detection.box
            x = min(max((x0 + x1) / 2 / scale, 0.0), size[1] - 1.0)
            y = min(max((y0 + y1) / 2 / scale, 0.0), size[0] - 1.0)
            points.append((round(x), round(y)))
        if points:
            return list(dict.fromkeys(points))  # two boxes can share a centre
        height, width = size
        return [
            (round(width * fx), round(height * fy)) for fy in (0.25, 0.75) for fx in (0.25, 0.75)
        ]

    def _save(self, fig, name: str) -> Path:
        path = self.output_dir / name
        fig.savefig(path, bbox_inches="tight", pad_inches=0.1)  # no empty margins
        return path


def build_visualized_model(cfg: CfgNode, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)  # --random-weights draws the same model every time
    model = build_model(cfg)
    if args.random_weights:
        logger.warning(
            "--random-weights: the model is randomly initialised; the maps show no learning."
        )
    else:
        build_checkpointer(cfg, model).resume_or_load(args.weights, resume=False)
    return model.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.weights and not args.random_weights:
        parser.error(
            "--weights FILE is required (or --random-weights for a randomly initialised model)"
        )
    if args.max_detections < 1:
        parser.error(f"--max-detections must be at least 1, got {args.max_detections}")
    setup_logger(name="fvcore")
    setup_logger(name="detr_d2")
    cfg = setup_cfg(args)
    try:
        paths = list_images(args.input)
    except FileNotFoundError as e:
        parser.error(str(e))
    if not paths:
        parser.error(f"no images found in --input {' '.join(args.input)}")
    model = build_visualized_model(cfg, args)
    output_dir = Path(args.output)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        visualizer = AttentionVisualizer(
            cfg,
            model,
            output_dir,
            score_threshold=args.score_threshold,
            layer=args.layer,
            head=args.head,
            points=args.points,
            max_detections=args.max_detections,
            names=class_names(cfg),
        )
    except ValueError as e:  # --layer or --head out of the model's range
        parser.error(str(e))
    written, failed = [], []
    for path in tqdm.tqdm(paths, desc="attention maps", unit="image", disable=len(paths) < 2):
        try:
            written += visualizer(path)
        except OSError as e:  # an unreadable image should not stop a folder's run
            logger.error(f"{path}: {e}")
            failed.append(path)
    logger.info(
        f"Wrote {len(written)} PNG files for {len(paths) - len(failed)} image(s) to {output_dir}"
    )
    if failed:
        logger.error(f"{len(failed)} image(s) failed: {', '.join(map(str, failed))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
