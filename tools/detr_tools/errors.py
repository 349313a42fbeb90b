"""Where a detector's missing AP50 goes: misses, duplicates, badly placed and background boxes.

DETR is trained to emit one box per object; its typical failure early in training is a second,
lower-scored box on an object already found (a duplicate), which costs precision at high recall
although the first box is right. COCO AP does not say which error dominates; this breakdown
does. Detections are matched greedily per image in descending score at IoU 0.5, as COCO's
evaluation does at that threshold (one category, or categories matched separately).
"""

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.structures import Boxes, BoxMode, pairwise_iou

logger = logging.getLogger(__name__)

__all__ = ["ErrorBreakdown", "error_breakdown", "error_breakdown_from_files"]

MATCH_IOU = 0.5
BACKGROUND_IOU = 0.1  # below this a false positive touches no object at all


@dataclass
class ErrorBreakdown:
    """Counts at IoU 0.5. ``false_positives`` are those scored >= ``score_threshold``."""

    num_objects: int
    recall: float  # objects found by any detection, whatever its score
    precision_at_recall_90: float  # interpolated (max precision at recall >= 0.9); 0 if never
    score_threshold: float
    true_positives: int
    missed: int  # objects without a detection scored >= the threshold
    duplicates: int  # IoU >= 0.5 with an object that a higher-scored detection already found
    badly_placed: int  # 0.1 <= best IoU < 0.5
    background: int  # best IoU < 0.1

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("objects", str(self.num_objects)),
            ("recall (any score)", f"{100 * self.recall:.1f} %"),
            ("precision at recall 0.9", f"{self.precision_at_recall_90:.3f}"),
            (f"true positives (score >= {self.score_threshold})", str(self.true_positives)),
            ("missed objects", str(self.missed)),
            ("false positives: duplicates", str(self.duplicates)),
            ("false positives: badly placed", str(self.badly_placed)),
            ("false positives: background", str(self.background)),
        ]


def _classify_image(gt_boxes: torch.Tensor, dets: list[dict]) -> list[tuple[float, str]]:
    """(score, kind) per detection, in descending score; kind is "tp", "duplicate",
    "badly_placed" or "background"."""
    dets = sorted(dets, key=lambda d: -d["score"])
    if not dets:
        return []
    det_boxes = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).view(-1, 4)
    det_boxes = BoxMode.convert(det_boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
    if len(gt_boxes) == 0:
        return [(d["score"], "background") for d in dets]
    iou = pairwise_iou(Boxes(det_boxes), Boxes(gt_boxes))  # [D, G]
    found = torch.zeros(len(gt_boxes), dtype=torch.bool)
    kinds = []
    for det, row in zip(dets, iou):
        free = torch.where(found, torch.full_like(row, -1.0), row)
        best = int(free.argmax())
        if free[best] >= MATCH_IOU:
            found[best] = True
            kinds.append((det["score"], "tp"))
        elif row.max() >= MATCH_IOU:
            kinds.append((det["score"], "duplicate"))
        elif row.max() >= BACKGROUND_IOU:
            kinds.append((det["score"], "badly_placed"))
        else:
            kinds.append((det["score"], "background"))
    return kinds


def error_breakdown(
    gt: dict, results: list[dict], score_threshold: float = 0.3, category_id: int | None = None
) -> ErrorBreakdown:
    """Breakdown of ``results`` (COCO result dicts: image_id, category_id, bbox xywh, score)
    against the COCO dataset dict ``gt``, for ``category_id`` (None: all categories as one).
    Crowd annotations are left out of the objects. Results on images absent from ``gt`` raise
    a ValueError naming the image id."""
    image_ids = {image["id"] for image in gt["images"]}
    objects: dict[int, list] = {i: [] for i in image_ids}
    for ann in gt.get("annotations", []):
        if ann.get("iscrowd", 0) or (category_id is not None and ann["category_id"] != category_id):
            continue
        objects[ann["image_id"]].append(ann["bbox"])
    detections: dict[int, list] = {i: [] for i in image_ids}
    for result in results:
        if result["image_id"] not in detections:
            raise ValueError(
                f"result for image id {result['image_id']}, which the ground truth lacks"
            )
        if category_id is None or result["category_id"] == category_id:
            detections[result["image_id"]].append(result)
    kinds = []
    for image_id in sorted(image_ids):
        boxes = torch.tensor(objects[image_id], dtype=torch.float32).view(-1, 4)
        kinds += _classify_image(
            BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS), detections[image_id]
        )
    num_objects = sum(len(v) for v in objects.values())
    kinds.sort(key=lambda k: -k[0])
    is_tp = np.array([k == "tp" for _, k in kinds], dtype=bool)
    tp_cum = np.cumsum(is_tp)
    recall = tp_cum / max(num_objects, 1)
    precision = tp_cum / np.arange(1, len(kinds) + 1)
    reaching = precision[recall >= 0.9]
    above = [k for s, k in kinds if s >= score_threshold]
    true_positives = above.count("tp")
    return ErrorBreakdown(
        num_objects=num_objects,
        recall=float(recall[-1]) if len(kinds) else 0.0,
        precision_at_recall_90=float(reaching.max()) if len(reaching) else 0.0,
        score_threshold=score_threshold,
        true_positives=true_positives,
        missed=num_objects - true_positives,
        duplicates=above.count("duplicate"),
        badly_placed=above.count("badly_placed"),
        background=above.count("background"),
    )


def error_breakdown_from_files(
    gt_json: str, results_json: str, score_threshold: float = 0.3
) -> ErrorBreakdown:
    """:func:`error_breakdown` of a COCO ground-truth json and a results json (Detectron2's
    ``inference/<dataset>/coco_instances_results.json``)."""
    with open(gt_json) as f:
        gt = json.load(f)
    with open(results_json) as f:
        results = json.load(f)
    try:
        return error_breakdown(gt, results, score_threshold)
    except ValueError as e:
        raise ValueError(f"{results_json} against {gt_json}: {e}") from e
