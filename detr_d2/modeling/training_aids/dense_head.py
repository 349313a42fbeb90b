"""A training-only dense detection head on the encoder output (Co-DETR-style auxiliary head, an
FCOS-like one-stage head): every location of the feature map near an object's centre is a
positive, so the encoder and the backbone get many supervised positions per object and step,
instead of the one query per object of the set loss. It is dropped at inference.

Shapes: N images, C channels, H x W the feature map, K classes, P positive locations.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from ..criterion import LossBranch, average_over_workers
from ..segmentation import sigmoid_focal_loss
from .base import TrainingAid, TrainingStep


class DenseAuxHead(TrainingAid):
    """Two 3x3 conv + GroupNorm + ReLU layers, then per-location class logits and the distances
    (left, top, right, bottom) from the location to its object's box edges. It adds no queries;
    its branch has a loss of its own (``loss_dense_cls``, ``loss_dense_giou``)."""

    slot = "dense_head"
    config_key = "MODEL.DETR.TRAINING_AIDS.DENSE_AUX"

    def __init__(
        self,
        channels: int,
        num_classes: int,
        center_radius: float = 1.5,
        loss_weight: float = 1.0,
    ):
        """
        Args:
            channels: C of the feature map (the transformer width).
            num_classes: K.
            center_radius: a location is a positive of a box when it lies inside the box and
                within this many strides of the box centre (FCOS centre sampling).
            loss_weight: weight of both losses (``MODEL.DETR.TRAINING_AIDS.DENSE_AUX.WEIGHT``).
        """
        super().__init__()
        layers = []
        for _ in range(2):
            layers += [
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.GroupNorm(8, channels),
                nn.ReLU(),
            ]
        self.tower = nn.Sequential(*layers)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_distances = nn.Conv2d(channels, 4, 3, padding=1)
        nn.init.constant_(self.cls_logits.bias, -math.log(99.0))  # focal prior p = 0.01
        self.num_classes = num_classes
        self.center_radius = center_radius
        self.loss_weight = loss_weight

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, C, H, W] -> class logits [N, K, H, W], distances [N, 4, H, W] in strides (>= 0)."""
        x = self.tower(feature)
        return self.cls_logits(x), F.softplus(self.box_distances(x))

    def loss_branches(
        self, step: TrainingStep, own: slice | None, branches: list[LossBranch]
    ) -> list[LossBranch]:
        """The dense branch: this head on the encoder output, scored by :meth:`losses`."""
        cls_logits, distances = self(step.memory)
        outputs = {
            "cls_logits": cls_logits,
            "distances": distances,
            "padding": step.padding,
            "image_sizes": step.image_sizes,
            "stride": step.stride,
        }
        return [*branches, LossBranch("", outputs, step.targets, self.loss_weight, loss=self._loss)]

    def _loss(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        return self.losses(targets=targets, **outputs)

    def losses(
        self,
        cls_logits: torch.Tensor,
        distances: torch.Tensor,
        padding: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        image_sizes: Sequence[tuple[int, int]],
        stride: float,
    ) -> dict[str, torch.Tensor]:
        """``loss_dense_cls`` (sigmoid focal over the unpadded locations, per positive) and
        ``loss_dense_giou`` (1 - GIoU of the positives' boxes), both normalised by the number
        of positives. ``padding``: bool [N, H, W], True on padding; ``targets`` as for the
        set criterion (normalised cxcywh boxes); ``stride``: input pixels per feature cell."""
        n, _, height, width = cls_logits.shape
        device = cls_logits.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
        points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # [H*W, 2]
        cls_targets = torch.zeros_like(cls_logits).flatten(2).transpose(1, 2)  # [N, H*W, K]
        pred_boxes, gt_boxes = [], []
        for i, (target, (h, w)) in enumerate(zip(targets, image_sizes)):
            if len(target["boxes"]) == 0:
                continue
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=device)
            boxes = box_cxcywh_to_xyxy(target["boxes"].float()) * scale  # [G, 4] pixels
            assigned = self._assign(points, boxes, stride)  # [H*W], -1 = background
            positive = assigned >= 0
            cls_targets[i, positive, target["labels"][assigned[positive]]] = 1.0
            d = distances[i].flatten(1).t()[positive] * stride  # [P_i, 4] pixels
            p = points[positive]
            pred_boxes.append(torch.cat([p - d[:, :2], p + d[:, 2:]], 1))
            gt_boxes.append(boxes[assigned[positive]])
        valid = ~padding.flatten(1)  # [N, H*W]
        logits = cls_logits.flatten(2).transpose(1, 2)[valid]  # [V, K]
        # averaged over workers like the set loss's num_boxes, so 2 processes train like 1
        count = torch.as_tensor([float(sum(len(b) for b in gt_boxes))], device=device)
        num_positives = max(average_over_workers(count).item(), 1.0)
        # sigmoid_focal_loss averages over its second dimension: times K is the sum over classes
        loss_cls = sigmoid_focal_loss(logits, cls_targets[valid], num_positives) * self.num_classes
        if not gt_boxes:
            return {"loss_dense_cls": loss_cls, "loss_dense_giou": distances.sum() * 0.0}
        giou = paired_generalized_box_iou(torch.cat(pred_boxes), torch.cat(gt_boxes))
        return {"loss_dense_cls": loss_cls, "loss_dense_giou": (1 - giou).sum() / num_positives}

    def _assign(self, points: torch.Tensor, boxes: torch.Tensor, stride: float) -> torch.Tensor:
        """Index of the box each location regresses (the smallest containing it near its
        centre), -1 for background; every box keeps at least the location nearest its centre."""
        centers = (boxes[:, :2] + boxes[:, 2:]) / 2  # [G, 2]
        inside = (points[:, None, :] > boxes[None, :, :2]) & (
            points[:, None, :] < boxes[None, :, 2:]
        )
        near = (points[:, None, :] - centers[None]).abs() < self.center_radius * stride
        candidate = (inside & near).all(-1)  # [H*W, G]
        nearest = (points[:, None, :] - centers[None]).norm(dim=-1).argmin(0)  # [G]
        candidate[nearest, torch.arange(len(boxes), device=boxes.device)] = True
        area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)  # [G]
        cost = torch.where(
            candidate,
            area[None].expand_as(candidate),
            torch.full_like(candidate, float("inf"), dtype=area.dtype),
        )
        best_cost, best = cost.min(1)
        return torch.where(torch.isfinite(best_cost), best, torch.full_like(best, -1))

    def extra_repr(self) -> str:
        return f"center_radius={self.center_radius}, loss_weight={self.loss_weight}"
