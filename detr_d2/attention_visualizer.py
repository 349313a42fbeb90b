"""Attention figures of one image at a time: each detection's decoder cross-attention, the
encoder self-attention at chosen pixels, and a one-page summary (DETR paper Fig. 3 and 6);
``tools/visualize_attention.py`` calls :class:`AttentionVisualizer` over its inputs."""

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .attention import attention_to_image, capture_attention, point_to_token
from .modeling.postprocessing import detection_inference
from .predictor import DetrPredictor
from .visualization import (
    Detection,
    EncoderPoint,
    decoder_attention_figure,
    encoder_attention_figure,
    summary_figure,
)

__all__ = ["AttentionVisualizer"]

logger = logging.getLogger(__name__)

MAX_DISPLAY_SIDE = 1024  # larger images are drawn smaller: the maps have ~1/32 resolution anyway
FALLBACK_QUERIES = 3
MAX_AUTO_POINTS = 4


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
        predictor: DetrPredictor,
        output_dir: Path,
        *,
        score_threshold: float,
        layer: int,
        head: int | None,
        points: Sequence[tuple[float, float]] | None,
        max_detections: int,
    ):
        transformer = predictor.model.transformer
        self.predictor = predictor
        self.model = predictor.model
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
        self._stems: dict[str, int] = {}

    def _stem(self, path: Path) -> str:
        """The file-name prefix of an image; numbered when two inputs share a name."""
        stem = _slug(path.stem)
        self._stems[stem] = self._stems.get(stem, 0) + 1
        return stem if self._stems[stem] == 1 else f"{stem}-{self._stems[stem]}"

    def _select(self, result, stem: str) -> list[Detection]:
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
            name = self.predictor.class_name(int(labels[q]))
            box = tuple(boxes[q].tolist())
            detections.append(Detection(q, name, float(scores[q]), box, f"{prefix}{i:02d}"))
        return detections

    def __call__(self, path: Path) -> list[Path]:
        """Write the figures of one image; returns the files written."""
        stem = self._stem(path)
        original = self.predictor.read_image(str(path))
        height, width = original.shape[:2]
        inputs = [self.predictor.model_input(original)]  # the test resize of evaluation
        with capture_attention(self.model) as attention:
            raw = self.model.predict_raw(inputs)
        images = self.model.preprocess_image(inputs)  # the sizes the model saw: real and padded
        image_size, padded_size = tuple(images.image_sizes[0]), tuple(images.tensor.shape[-2:])
        mask = attention.padding_mask[0].cpu()

        # figures show the original image, at most MAX_DISPLAY_SIDE pixels wide or high
        scale = min(1.0, MAX_DISPLAY_SIDE / max(height, width))
        shown_size = (max(round(height * scale), 1), max(round(width * scale), 1))
        rgb = self.predictor.to_rgb(original)
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
        detections: Sequence[Detection], scale: float, size: tuple[int, int]
    ) -> list[tuple[float, float]]:
        """Centres of the best detections (original pixels), else a 2x2 grid over the image."""
        points: list[tuple[float, float]] = []
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
