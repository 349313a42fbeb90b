"""Box helpers in DETR's conventions (normalized cxcywh predictions, xyxy for IoU)."""

import torch
from torchvision.ops import generalized_box_iou

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "paired_generalized_box_iou",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def paired_generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, giou: bool = True
) -> torch.Tensor:
    """GIoU (or with ``giou=False`` plain IoU) of ``boxes1[..., i, :]`` with ``boxes2[..., i, :]``:
    xyxy boxes [..., 4] of broadcastable shapes -> [...]. [M, 4] with [M, 4] is the diagonal of
    the pairwise matrix without computing it; [Q, 1, 4] with [G, 4] is the [Q, G] matrix."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    inter_wh = torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(
        boxes1[..., :2], boxes2[..., :2]
    )
    inter = inter_wh.clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    if not giou:
        return inter / union
    hull_wh = torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(
        boxes1[..., :2], boxes2[..., :2]
    )
    hull = hull_wh.clamp(min=0).prod(-1)
    return inter / union - (hull - union) / hull
