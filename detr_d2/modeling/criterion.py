"""DETR's set prediction loss (paper Sec. 3.1, Eq. 2; appendix A.2).

Shapes: N images, Q queries, K + 1 logits (last = "no object"), G_i targets of image i,
M = sum_i G_i matched pairs in the batch.

``outputs`` dicts hold ``pred_logits [N, Q, K+1]``, ``pred_boxes [N, Q, 4]`` (normalized cxcywh)
and optionally ``aux_outputs`` (a list of such dicts, one per earlier decoder layer).
``targets`` is a list of N dicts with ``labels [G_i]`` (int64 in [0, K)) and ``boxes [G_i, 4]``
(normalized cxcywh).
"""
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from .box_ops import box_cxcywh_to_xyxy
from .matcher import HungarianMatcher

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def average_num_boxes(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> float:
    """Number of target boxes per worker, averaged over all workers, at least 1.

    Every worker normalises its box losses by the same number, so gradients summed by DDP equal
    those of one big batch (the official code all-reduces the same way).
    """
    num_boxes = torch.as_tensor(
        [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device
    )
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(num_boxes)
    return torch.clamp(num_boxes / comm.get_world_size(), min=1).item()


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of ``boxes1[i]`` with ``boxes2[i]``: [M, 4] xyxy each -> [M] (the diagonal of the
    pairwise GIoU matrix, without computing the M x M matrix)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2]))
    inter = inter_wh.clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2]))
    hull = hull_wh.clamp(min=0).prod(-1)
    return inter / union - (hull - union) / hull


class SetCriterion(nn.Module):
    """Matches predictions to targets, then applies classification and box losses.

    ``forward`` returns only weighted ``loss_*`` tensors (Detectron2 sums every entry of the loss
    dict); auxiliary-layer terms carry the suffix ``_{i}``. ``class_error`` and
    ``cardinality_error`` of the last layer go to Detectron2's event storage.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str] = ("labels", "boxes"),
    ):
        super().__init__()
        unknown = set(losses) - set(self._loss_table())
        if unknown:
            raise ValueError(f"Unknown DETR loss terms {sorted(unknown)}; known: {list(self._loss_table())}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def _loss_table(self) -> Dict[str, Callable]:
        return {"labels": self.loss_labels, "boxes": self.loss_boxes}

    @staticmethod
    def _matched_query_index(indices: Indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """(image index [M], query index [M]) of every matched prediction."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        """Cross-entropy over all queries; unmatched ones are "no object" (weight eos_coef)."""
        logits = outputs["pred_logits"].float()  # [N, Q, K+1]
        idx = self._matched_query_index(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[idx] = target_classes_o.to(logits.device)
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        """L1 and GIoU losses of the matched boxes, normalised by the number of target boxes."""
        idx = self._matched_query_index(indices)
        src_boxes = outputs["pred_boxes"][idx].float()  # [M, 4]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        target_boxes = target_boxes.to(src_boxes.device)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(
            box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)
        )
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    @torch.no_grad()
    def metrics(self, outputs, targets, indices) -> Dict[str, float]:
        """Diagnostics of one decoder layer (not losses): ``class_error`` (% of matched queries
        whose top class is wrong, 100 when nothing is matched) and ``cardinality_error`` (mean
        absolute difference between the number of non-"no object" predictions and targets)."""
        logits = outputs["pred_logits"]
        idx = self._matched_query_index(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        if target_classes_o.numel() == 0:
            class_error = 100.0
        else:
            correct = logits[idx].argmax(-1) == target_classes_o.to(logits.device)
            class_error = 100.0 - 100.0 * correct.float().mean().item()
        num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        num_gt = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"class_error": class_error, "cardinality_error": F.l1_loss(num_pred, num_gt).item()}

    def compute(self, outputs, targets) -> Tuple[Dict[str, torch.Tensor], Dict[str, float], List[Indices]]:
        """Unweighted losses of every layer, last-layer metrics, and the matches of every layer
        (last layer first, then the auxiliary layers in order)."""
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)
        gt_classes = [t["labels"] for t in targets]
        gt_boxes = [t["boxes"] for t in targets]
        layers = [(outputs, "")] + [
            (aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))
        ]
        losses, all_indices = {}, []
        for layer_outputs, suffix in layers:
            indices = self.matcher(
                layer_outputs["pred_logits"], layer_outputs["pred_boxes"], gt_classes, gt_boxes
            )
            all_indices.append(indices)
            for name in self.losses:
                terms = self._loss_table()[name](layer_outputs, targets, indices, num_boxes)
                losses.update({k + suffix: v for k, v in terms.items()})
        metrics = self.metrics(outputs, targets, all_indices[0])
        return losses, metrics, all_indices

    def forward(self, outputs, targets) -> Dict[str, torch.Tensor]:
        losses, metrics, _ = self.compute(outputs, targets)
        storage = get_event_storage()
        for name, value in metrics.items():
            storage.put_scalar(name, value)
        return {k: v * self.weight_dict[k] for k, v in losses.items()}

    def extra_repr(self) -> str:
        base = {k: v for k, v in self.weight_dict.items() if not k[-1].isdigit()}
        return f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, weights={base}"


def build_weight_dict(base: Dict[str, float], num_aux_layers: int) -> Dict[str, float]:
    """Weights of the final layer's terms, repeated for every auxiliary layer (suffix ``_{i}``)."""
    weights = dict(base)
    for i in range(num_aux_layers):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights
