"""Turn DETR's raw head outputs into Detectron2 ``Instances`` (and, later, segmentations)."""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from .box_ops import box_cxcywh_to_xyxy


def detection_inference(
    pred_logits: torch.Tensor, pred_boxes: torch.Tensor, output_sizes: Sequence[Tuple[int, int]]
) -> List[Instances]:
    """One ``Instances`` per image with every query, as the official ``PostProcess``.

    Args:
        pred_logits: [N, Q, K+1] logits, the last column is "no object".
        pred_boxes: [N, Q, 4] cxcywh boxes normalized by each unpadded input image.
        output_sizes: N (height, width) the boxes are scaled to.
    Returns:
        N ``Instances`` of Q entries: ``scores`` and ``pred_classes`` from the softmax without the
        "no object" column, ``pred_boxes`` in absolute xyxy pixels of the output size. Boxes are
        not clipped, as in the official implementation, so scores and AP match it.
    """
    scores, labels = F.softmax(pred_logits.float(), dim=-1)[..., :-1].max(-1)
    results = []
    for score, label, box, (height, width) in zip(scores, labels, pred_boxes, output_sizes):
        scale = torch.as_tensor([width, height, width, height], dtype=torch.float32, device=box.device)
        result = Instances((int(height), int(width)))
        result.pred_boxes = Boxes(box_cxcywh_to_xyxy(box.float()) * scale)
        result.scores = score
        result.pred_classes = label
        results.append(result)
    return results
