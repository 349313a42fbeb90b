"""Turn DETR's raw head outputs into Detectron2's output formats: ``Instances`` (boxes, and
full-resolution masks), semantic score maps and ``(panoptic_seg, segments_info)`` pairs.

Shapes: Q queries, K classes (+1 "no object" logit), H4 x W4 the mask logits' grid (1/4 of the
padded batch), h x w an input image's unpadded size, H x W the requested output size.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.structures import Boxes, Instances

from ..layout import ClassLayout
from .box_ops import box_cxcywh_to_xyxy


def class_probabilities(pred_logits: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """[..., K+1] logits -> [..., K] class probabilities without "no object": the softmax over
    all K + 1 logits (official DETR), or the sigmoid of the K class logits for models trained
    with a sigmoid classification loss (``MODEL.DETR.LOSS.CLASS_LOSS`` focal / ia_bce)."""
    if activation == "softmax":
        return F.softmax(pred_logits.float(), dim=-1)[..., :-1]
    return pred_logits[..., :-1].float().sigmoid()


def detection_inference(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    output_sizes: Sequence[tuple[int, int]],
    activation: str = "softmax",
) -> list[Instances]:
    """One ``Instances`` per image with every query, as the official ``PostProcess``.

    Args:
        pred_logits: [N, Q, K+1] logits, the last column is "no object".
        pred_boxes: [N, Q, 4] cxcywh boxes normalized by each unpadded input image.
        output_sizes: N (height, width) the boxes are scaled to.
        activation: scoring, see :func:`class_probabilities`.
    Returns:
        N ``Instances`` of Q entries: ``scores`` and ``pred_classes`` from the top class
        probability, ``pred_boxes`` in absolute xyxy pixels of the output size. Boxes are
        not clipped, as in the official implementation, so scores and AP match it.
    """
    scores, labels = class_probabilities(pred_logits, activation).max(-1)
    results = []
    tracing = torch.jit.is_tracing()
    for score, label, box, (height, width) in zip(scores, labels, pred_boxes, output_sizes):
        if tracing:  # sizes are traced tensors (TracingAdapter): keep them in the graph
            scale = torch.stack([width, height, width, height]).to(box)
            result = Instances(torch.stack([height, width]))
        else:
            scale = torch.as_tensor(
                [width, height, width, height], dtype=torch.float32, device=box.device
            )
            result = Instances((int(height), int(width)))
        result.pred_boxes = Boxes(box_cxcywh_to_xyxy(box.float()) * scale)
        result.scores = score
        result.pred_classes = label
        results.append(result)
    return results


# Official PostProcessPanoptic drops segments of at most this many pixels (at the output size).
PANOPTIC_MAX_DROPPED_AREA = 4
# Masks are upsampled to the full padded size a few queries at a time, to bound memory.
_MASK_CHUNK = 16


def instance_masks(
    pred_masks: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """Binary masks at the output size, as the official ``PostProcessSegm``.

    Args:
        pred_masks: [Q, H4, W4] mask logits on the padded batch's grid.
        padded_size: (height, width) of the padded batch.
        image_size: (h, w) of this image inside the padded batch (top-left).
        output_size: (H, W) to return.
        threshold: on the sigmoid probability.
    Returns:
        bool [Q, H, W]: logits upsampled (bilinear) to the padded size, thresholded, cropped to
        the image, then resized (nearest) to the output size.
    """
    height, width = image_size
    chunks = []
    for chunk in pred_masks.float().split(_MASK_CHUNK):
        masks = F.interpolate(
            chunk[:, None], size=tuple(padded_size), mode="bilinear", align_corners=False
        )
        masks = (masks.sigmoid() > threshold)[:, :, :height, :width].float()
        masks = F.interpolate(masks, size=tuple(output_size), mode="nearest")[:, 0]
        chunks.append(masks > 0.5)
    if not chunks:
        return torch.zeros((0, *output_size), dtype=torch.bool, device=pred_masks.device)
    return torch.cat(chunks)


def instance_inference(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    pred_masks: torch.Tensor | None,
    *,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    thing_ids: Collection[int] | None = None,
    mask_threshold: float = 0.5,
    activation: str = "softmax",
) -> Instances:
    """One image's ``Instances``: :func:`detection_inference`, restricted to the queries whose
    class is in ``thing_ids`` (all of them when ``None``), with ``pred_masks`` (bool [Q', H, W],
    see :func:`instance_masks`) when ``pred_masks`` [Q, H4, W4] is given."""
    result = detection_inference(pred_logits[None], pred_boxes[None], [output_size], activation)[0]
    keep = None
    if thing_ids is not None:
        thing_ids = torch.as_tensor(sorted(thing_ids), dtype=torch.int64, device=pred_logits.device)
        keep = torch.isin(result.pred_classes, thing_ids)
        result = result[keep]
    if pred_masks is not None:
        masks = pred_masks if keep is None else pred_masks[keep]
        result.pred_masks = instance_masks(
            masks, padded_size, image_size, output_size, mask_threshold
        )
    return result


def semantic_inference(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> torch.Tensor:
    """Per-class scores [K, H, W]: the sum over queries of the class probability (without "no
    object") times the mask probability, on the unpadded image, resized (bilinear) to the output
    size (the same marginalisation as MaskFormer's semantic inference)."""
    height, width = image_size
    probs = F.softmax(pred_logits.float(), dim=-1)[:, :-1]  # [Q, K]
    masks = F.interpolate(
        pred_masks[None].float(), size=tuple(padded_size), mode="bilinear", align_corners=False
    )
    masks = masks[0, :, :height, :width].sigmoid()  # [Q, h, w]
    scores = torch.einsum("qk,qhw->khw", probs, masks)
    if tuple(output_size) != (height, width):
        scores = F.interpolate(
            scores[None], size=tuple(output_size), mode="bilinear", align_corners=False
        )[0]
    return scores


def _segment_id_map(
    masks: torch.Tensor,
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    merge: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 [H, W]: for each pixel, the index of the mask with the highest logit.

    Args:
        masks: [S, h*w] mask logits at the image size (S >= 1).
        merge: [S] optional index of the segment each mask's pixels go to (stuff merging).
    The map is computed at the image size and resized (nearest) to the output size, sampling
    the same pixels as PIL's NEAREST resize of the official code.
    """
    # softmax before argmax as the official code, so that near-ties resolve identically
    ids = masks.softmax(0).argmax(0).view(tuple(image_size))
    if merge is not None:
        ids = merge[ids]
    if tuple(output_size) != tuple(image_size):
        rows = _pil_nearest_indices(image_size[0], output_size[0]).to(ids.device)
        cols = _pil_nearest_indices(image_size[1], output_size[1]).to(ids.device)
        ids = ids[rows[:, None], cols[None, :]]
    return ids


def _pil_nearest_indices(size_in: int, size_out: int) -> torch.Tensor:
    """Source index of each output pixel in PIL's NEAREST resize: the pixel centre's position,
    accumulated step by step in float64 and truncated, as Pillow's ImagingScaleAffine does
    (``F.interpolate(mode="nearest-exact")`` differs from it on some sizes)."""
    step = size_in / size_out
    positions = np.full(size_out, step)
    positions[0] = 0.5 * step
    return torch.from_numpy(np.minimum(np.add.accumulate(positions).astype(np.int64), size_in - 1))


def panoptic_inference(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    thing_ids: Collection[int],
    threshold: float = 0.85,
) -> tuple[torch.Tensor, list[dict]]:
    """One image's panoptic segmentation, as the official ``PostProcessPanoptic``.

    Args:
        pred_logits: [Q, K+1] class logits (the last is "no object").
        pred_masks: [Q, H4, W4] mask logits on the padded batch's grid.
        image_size: (h, w) of the unpadded input image.
        output_size: (H, W) of the returned map.
        thing_ids: the classes that are things; every other class is stuff.
        threshold: keep the queries whose top class (over all K+1) is not "no object" and whose
            probability exceeds it (official: 0.85).
    Returns:
        ``panoptic_seg``: int32 [H, W] segment ids, 0 = void (only when nothing is kept);
        ``segments_info``: one dict per segment id 1..S: ``id``, ``category_id`` (class index),
        ``isthing``, ``score`` (the query's class probability) and ``area`` (pixels).

    The rules of the official code: the masks of the padded grid are resized (bilinear) to the
    image size without cropping the padding first; each pixel goes to the kept query with the
    highest mask logit; in a first pass all queries of one stuff class count as one segment (the
    first of them), so the others end up empty; then segments of at most 4 pixels are removed
    and the pixels re-assigned among the rest (without merging), until none is that small.
    """
    device = pred_logits.device
    scores, labels = F.softmax(pred_logits.float(), dim=-1).max(-1)
    keep = (labels != pred_logits.shape[-1] - 1) & (scores > threshold)
    if not keep.any():
        return torch.zeros(tuple(output_size), dtype=torch.int32, device=device), []
    scores, labels = scores[keep], labels[keep]
    masks = pred_masks[keep][:, None].float()
    masks = F.interpolate(masks, size=tuple(image_size), mode="bilinear", align_corners=False)
    masks = masks.flatten(1)  # [S, h*w]

    thing_set = {int(i) for i in thing_ids}
    is_thing = [int(label) in thing_set for label in labels.tolist()]
    merge, first_of_class = [], {}
    for index, (label, thing) in enumerate(zip(labels.tolist(), is_thing)):
        merge.append(index if thing else first_of_class.setdefault(label, index))
    ids = _segment_id_map(masks, image_size, output_size, torch.as_tensor(merge, device=device))
    areas = torch.bincount(ids.flatten(), minlength=len(labels))
    while True:
        small = areas <= PANOPTIC_MAX_DROPPED_AREA
        if not small.any():
            break
        kept = (~small).nonzero()[:, 0]
        masks, scores, labels = masks[kept], scores[kept], labels[kept]
        is_thing = [is_thing[i] for i in kept.tolist()]
        if len(labels) == 0:
            return torch.zeros(tuple(output_size), dtype=torch.int32, device=device), []
        ids = _segment_id_map(masks, image_size, output_size)
        areas = torch.bincount(ids.flatten(), minlength=len(labels))

    segments_info = [
        {"id": i + 1, "category_id": label, "isthing": thing, "score": score, "area": area}
        for i, (label, thing, score, area) in enumerate(
            zip(labels.tolist(), is_thing, scores.tolist(), areas.tolist())
        )
    ]
    return (ids + 1).to(torch.int32), segments_info


def image_sizes_tensor(
    image_sizes: torch.Tensor | Sequence[Sequence], device: torch.device
) -> torch.Tensor:
    """int64 [N, 2] (height, width) of ``ImageList.image_sizes``, which holds int pairs in eager
    mode, 1-D size tensors under ``torch.jit.trace`` (Detectron2's ``ImageList.from_tensors``)
    and is a tensor [N, 2] in exported graphs; the traced forms stay traced."""
    if isinstance(image_sizes, torch.Tensor):
        return image_sizes.to(device=device, dtype=torch.int64)
    if len(image_sizes) and isinstance(image_sizes[0], torch.Tensor):
        return torch.stack(list(image_sizes)).to(device=device, dtype=torch.int64)
    return torch.as_tensor(image_sizes, device=device)


@dataclass(frozen=True)
class PostprocessOptions:
    """The switches and thresholds of DETR's post-processing (``MODEL.DETR.TEST``), the same for
    :class:`~detr_d2.modeling.detr.Detr` and exported models (which store them in their JSON).

    Attributes:
        num_classes, mask_on: K and whether there are mask logits (the model's).
        instance_on, semantic_on, panoptic_on: return ``instances`` (with ``pred_masks`` if
            ``mask_on``), ``sem_seg`` [K, H, W], ``panoptic_seg`` (both need ``mask_on``).
        thing_ids: the classes that are things (None: all). Instances are restricted to them,
            and panoptic segments of other classes are stuff.
        panoptic_threshold: class probability a query needs to enter the panoptic output.
        mask_threshold: probability threshold of the binary instance masks.
        score_activation: how logits become scores: "softmax" (official), or "sigmoid" for
            models trained with a sigmoid class loss (see :func:`class_probabilities`).
    """

    num_classes: int
    mask_on: bool = False
    instance_on: bool = True
    semantic_on: bool = False
    panoptic_on: bool = False
    thing_ids: tuple[int, ...] | None = None
    panoptic_threshold: float = 0.85
    mask_threshold: float = 0.5
    score_activation: str = "softmax"

    def __post_init__(self):
        if self.thing_ids is not None:  # a list from a config or an export's JSON
            object.__setattr__(self, "thing_ids", tuple(int(i) for i in self.thing_ids))

    @classmethod
    def from_config(cls, cfg: CfgNode, layout: ClassLayout) -> "PostprocessOptions":
        """The options of ``MODEL.DETR.TEST`` for a model of ``layout``'s classes; the scores of
        a sigmoid class loss (``MODEL.DETR.LOSS.CLASS_LOSS`` focal / ia_bce) are sigmoids."""
        test, class_loss = cfg.MODEL.DETR.TEST, cfg.MODEL.DETR.LOSS.CLASS_LOSS
        return cls(
            num_classes=layout.num_classes,
            mask_on=cfg.MODEL.MASK_ON,
            instance_on=test.INSTANCE_ON,
            semantic_on=test.SEMANTIC_ON,
            panoptic_on=test.PANOPTIC_ON,
            thing_ids=None if layout.all_things else layout.thing_ids,
            panoptic_threshold=test.PANOPTIC_THRESHOLD,
            mask_threshold=test.MASK_THRESHOLD,
            score_activation="softmax" if class_loss == "softmax" else "sigmoid",
        )


def instances_results(
    outputs: dict[str, torch.Tensor],
    options: PostprocessOptions,
    padded_size: tuple[int, int],
    image_sizes: Sequence[tuple[int, int]],
    output_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Instances]:
    """One ``Instances`` per image at ``output_sizes`` (default: ``image_sizes``) from the raw
    outputs ``pred_logits``, ``pred_boxes`` and, with ``mask_on``, ``pred_masks``; see
    :func:`detection_inference` and :func:`instance_inference`."""
    output_sizes = image_sizes if output_sizes is None else output_sizes
    if not options.mask_on and options.thing_ids is None:
        return detection_inference(
            outputs["pred_logits"], outputs["pred_boxes"], output_sizes, options.score_activation
        )
    return [
        instance_inference(
            outputs["pred_logits"][i],
            outputs["pred_boxes"][i],
            outputs["pred_masks"][i] if options.mask_on else None,
            padded_size=padded_size,
            image_size=image_sizes[i],
            output_size=size,
            thing_ids=options.thing_ids,
            mask_threshold=options.mask_threshold,
            activation=options.score_activation,
        )
        for i, size in enumerate(output_sizes)
    ]


def inference_results(
    outputs: dict[str, torch.Tensor],
    options: PostprocessOptions,
    padded_size: tuple[int, int],
    image_sizes: Sequence[tuple[int, int]],
    output_sizes: Sequence[tuple[int, int]],
) -> list[dict]:
    """Detectron2's per-image output dicts (``instances``, ``sem_seg``, ``panoptic_seg`` as
    switched on in ``options``) from the raw outputs of a padded batch of ``padded_size``,
    shared by the PyTorch model and the exported graphs (:mod:`detr_d2.export`)."""
    results = [{} for _ in output_sizes]
    if options.instance_on:
        instances = instances_results(outputs, options, padded_size, image_sizes, output_sizes)
        for result, per_image in zip(results, instances):
            result["instances"] = per_image
    thing_ids = range(options.num_classes) if options.thing_ids is None else options.thing_ids
    for i, result in enumerate(results):
        if options.semantic_on:
            result["sem_seg"] = semantic_inference(
                outputs["pred_logits"][i],
                outputs["pred_masks"][i],
                padded_size,
                image_sizes[i],
                output_sizes[i],
            )
        if options.panoptic_on:
            result["panoptic_seg"] = panoptic_inference(
                outputs["pred_logits"][i],
                outputs["pred_masks"][i],
                image_sizes[i],
                output_sizes[i],
                thing_ids=thing_ids,
                threshold=options.panoptic_threshold,
            )
    return results
