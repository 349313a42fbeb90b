"""Hungarian matching between DETR's predictions and the ground truth (paper Sec. 3.1, Eq. 1).

Shapes: N images, Q queries, K + 1 logits (last = "no object"), G_i ground-truth boxes of image i.
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising class + L1 + GIoU costs.

    The cost of a pair is ``cost_class * class_cost + cost_bbox * L1 + cost_giou * -GIoU``.
    With ``class_cost="softmax"`` the class cost is the negated softmax probability (official
    DETR, not the log-probability); with ``"focal"`` it is the focal-loss difference of the
    sigmoid probability, ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``
    (Deformable DETR), for models trained with a sigmoid classification loss.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("At least one of MODEL.DETR.COST_{CLASS,BBOX,GIOU} must be non-zero.")
        if class_cost not in ("softmax", "focal"):
            raise ValueError(f"class_cost must be 'softmax' or 'focal', got {class_cost!r}.")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_cost = class_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def _class_cost(self, logits: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """[L, N, Q, K+1] logits, [N, G] target classes -> [L, N, Q, G] class cost (lower is
        better)."""
        index = tgt_ids[None, :, None, :].expand(*logits.shape[:3], -1)
        if self.class_cost == "softmax":
            return -logits.softmax(-1).gather(-1, index)
        prob = logits.gather(-1, index).sigmoid()  # the "no object" column is unused here
        alpha, gamma = self.focal_alpha, self.focal_gamma
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        return positive - negative

    @torch.no_grad()
    def forward(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        gt_classes: list[torch.Tensor],
        gt_boxes: list[torch.Tensor],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            pred_logits: [N, Q, K+1] class logits.
            pred_boxes: [N, Q, 4] normalized cxcywh boxes.
            gt_classes: N tensors [G_i] of class ids in [0, K).
            gt_boxes: N tensors [G_i, 4] of normalized cxcywh boxes.
        Returns:
            N pairs ``(pred_idx, gt_idx)`` of int64 CPU tensors of length ``min(Q, G_i)``: query
            ``pred_idx[j]`` is matched to target ``gt_idx[j]``.
        """
        return self.match_layers(pred_logits[None], pred_boxes[None], gt_classes, gt_boxes)[0]

    @torch.no_grad()
    def match_layers(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        gt_classes: list[torch.Tensor],
        gt_boxes: list[torch.Tensor],
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`forward` for the outputs of L decoder layers at once: ``pred_logits``
        [L, N, Q, K+1], ``pred_boxes`` [L, N, Q, 4]; returns L lists of N index pairs. All
        layers and images share one cost computation and one device-to-host transfer."""
        layers, n, q = pred_logits.shape[:3]
        sizes = [len(b) for b in gt_boxes]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [[(empty, empty) for _ in range(n)] for _ in range(layers)]
        # Each image's predictions against its own targets, padded to the largest count G of
        # the batch (one [L, N, Q, G] cost; padded columns are cut before the assignment).
        # Not against all targets of the batch: with query groups that is G times the work.
        largest = max(sizes)
        tgt_ids = torch.zeros(n, largest, dtype=torch.int64, device=pred_logits.device)
        tgt_boxes = torch.full((n, largest, 4), 0.5, device=pred_logits.device)
        for i, (classes, boxes) in enumerate(zip(gt_classes, gt_boxes)):
            tgt_ids[i, : len(classes)] = classes
            tgt_boxes[i, : len(boxes)] = boxes
        boxes = pred_boxes.float()[:, :, :, None]  # [L, N, Q, 1, 4]
        cost_class = self._class_cost(pred_logits.float(), tgt_ids)
        cost_bbox = (boxes - tgt_boxes[None, :, None]).abs().sum(-1)
        cost_giou = -paired_generalized_box_iou(
            box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes)[None, :, None]
        )
        cost = (
            self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        )
        cost = cost.cpu()
        if not torch.isfinite(cost).all():
            bad = [
                name
                for name, t in (("pred_logits", pred_logits), ("pred_boxes", pred_boxes))
                if not torch.isfinite(t).all()
            ]
            raise FloatingPointError(
                f"Non-finite matching cost (non-finite {bad or 'GIoU of degenerate boxes'}): the "
                "model has diverged; lower SOLVER.BASE_LR or check the input data."
            )
        cost = cost.numpy()
        indices = []
        for layer in range(layers):
            indices.append([])
            for i, size in enumerate(sizes):
                pred_idx, gt_idx = linear_sum_assignment(cost[layer, i, :, :size])
                indices[-1].append(
                    (
                        torch.from_numpy(pred_idx.astype(np.int64, copy=False)),
                        torch.from_numpy(gt_idx.astype(np.int64, copy=False)),
                    )
                )
        return indices

    def extra_repr(self) -> str:
        text = (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}"
        )
        return text if self.class_cost == "softmax" else f"{text}, class_cost={self.class_cost}"
