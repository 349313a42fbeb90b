"""DETR's set prediction loss (paper Sec. 3.1, Eq. 2; appendix A.2).

Shapes: N images, Q queries, K + 1 logits (last = "no object"), G_i targets of image i,
M = sum_i G_i matched pairs in the batch.

``outputs`` dicts hold ``pred_logits [N, Q, K+1]``, ``pred_boxes [N, Q, 4]`` (normalized cxcywh),
with masks ``pred_masks [N, Q, H4, W4]`` (mask logits on the padded batch at 1/4 resolution),
and optionally ``aux_outputs`` (a list of such dicts, one per earlier decoder layer).
``targets`` is a list of N dicts with ``labels [G_i]`` (int64 in [0, K)), ``boxes [G_i, 4]``
(normalized cxcywh) and, for the "masks" term, ``masks [G_i, H_i, W_i]`` (0/1, at the
input-image resolution, top-left aligned with the image; zero-padded here to the largest H, W).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from ..precision import to_float32
from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, paired_generalized_box_iou
from .matcher import HungarianMatcher
from .segmentation import dice_loss, gt_mask_tensor, sigmoid_focal_loss, sigmoid_focal_terms

Indices = list[tuple[torch.Tensor, torch.Tensor]]


class Matches(NamedTuple):
    """The matched pairs of L decoder layers, flattened (M pairs): the prediction of query
    ``query[j]`` of image ``image[j]`` in layer ``layer[j]`` has target class ``labels[j]`` and
    box ``boxes[j]``."""

    layer: torch.Tensor
    image: torch.Tensor
    query: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor


def flatten_matches(
    layer_indices: Sequence[Indices], targets: list[dict[str, torch.Tensor]], device
) -> Matches:
    """L lists of N ``(pred_idx, gt_idx)`` pairs (the matcher's output) -> :class:`Matches`."""
    n = len(targets)
    pairs = [pair for indices in layer_indices for pair in indices]  # layer-major
    counts = torch.as_tensor([len(src) for src, _ in pairs])
    rows = torch.arange(len(pairs)).repeat_interleave(counts)  # layer * N + image
    sizes = torch.as_tensor([len(t["labels"]) for t in targets])
    offsets = torch.cumsum(sizes, 0) - sizes  # first target of each image in the concatenation
    target = torch.cat([gt for _, gt in pairs]) + offsets[rows % n]
    target = target.to(device)
    return Matches(
        layer=(rows // n).to(device),
        image=(rows % n).to(device),
        query=torch.cat([src for src, _ in pairs]).to(device),
        labels=torch.cat([t["labels"] for t in targets]).to(device)[target],
        boxes=torch.cat([t["boxes"] for t in targets]).to(device)[target],
    )


CLASS_LOSSES = ("softmax", "focal", "ia_bce")


@dataclass(frozen=True)
class LossBranch:
    """One set of predictions for :meth:`SetCriterion.branch_losses`, as data: plain DETR has one
    branch, every training aid adds one (or, query groups, widens the main one).

    Attributes:
        suffix: appended to each loss key (``""``: the main branch's keys; ``"_o2m"``, ``"_dn"``).
        outputs: the criterion's ``outputs`` dict (see the module docstring), or whatever
            ``loss`` takes.
        targets: N target dicts (``labels [G_i]``, ``boxes [G_i, 4]``) for ``outputs``.
        weight: factor on top of the criterion's ``weight_dict`` (DETR's own branch: 1).
        num_groups: G copies stacked group-major along the batch, each matched on its own and
            the losses averaged over them (:meth:`SetCriterion.compute`).
        identity_matches: no Hungarian matching: query j of each image is target j.
        terms: the loss terms (``"labels"``, ``"boxes"``, ``"masks"``); empty: the criterion's.
        loss: a loss of the branch's own, ``loss(outputs, targets) -> {key: unweighted loss}``,
            instead of the set losses (the dense head's); weighted by ``weight`` only.
    """

    suffix: str
    outputs: dict
    targets: list[dict[str, torch.Tensor]]
    weight: float = 1.0
    num_groups: int = 1
    identity_matches: bool = False
    terms: tuple[str, ...] = ()
    loss: Callable[[dict, list[dict]], dict[str, torch.Tensor]] | None = None

    def to_float32(self) -> "LossBranch":
        """The branch with its floating outputs in fp32 (the losses are computed in fp32)."""
        return replace(self, outputs=to_float32(self.outputs))


def average_over_workers(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over all workers (itself with one worker)."""
    if comm.get_world_size() == 1:
        return value
    value = value.clone()
    torch.distributed.all_reduce(value)
    return value / comm.get_world_size()


def average_num_boxes(targets: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Number of target boxes per worker, averaged over all workers, at least 1.

    Every worker normalises its box losses by the same number, so gradients averaged by DDP
    equal those of one big batch (the official code all-reduces the same way).
    """
    num_boxes = torch.as_tensor(
        [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device
    )
    return torch.clamp(average_over_workers(num_boxes), min=1).item()


class SetCriterion(nn.Module):
    """Matches predictions to targets, then applies classification, box and (optionally) mask
    losses; mask losses only on the last decoder layer, as the official code (aux masks are not
    predicted).

    ``forward`` returns only weighted ``loss_*`` tensors (Detectron2 sums every entry of the loss
    dict); auxiliary-layer terms carry the suffix ``_{i}``. ``class_error`` and
    ``cardinality_error`` of the last layer go to Detectron2's event storage.

    ``class_loss`` picks the classification term ``loss_ce``: ``"softmax"`` (official: weighted
    cross-entropy with a "no object" class), ``"focal"`` (sigmoid focal loss on the K class
    logits, Deformable DETR) or ``"ia_bce"`` (IoU-aware BCE: the matched query's target is
    ``p^alpha * IoU^(1-alpha)``, negatives weighted by ``p^gamma``; Align-DETR / RF-DETR). The
    sigmoid losses leave the "no object" logit unused, so the head keeps its K + 1 rows.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float,
        losses: Sequence[str] = ("labels", "boxes"),
        class_loss: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        unknown = set(losses) - set(self._loss_table())
        if unknown:
            raise ValueError(
                f"Unknown DETR loss terms {sorted(unknown)}; known: {list(self._loss_table())}"
            )
        if class_loss not in CLASS_LOSSES:
            raise ValueError(
                f"MODEL.DETR.LOSS.CLASS_LOSS must be one of {CLASS_LOSSES}, got {class_loss!r}."
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.class_loss = class_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def num_aux_layers(self) -> int:
        """n, the auxiliary decoder layers ``weight_dict`` weights: its ``_{i}`` keys must be every
        final-layer key with each suffix ``_0`` ... ``_{n-1}``, as :func:`build_weight_dict` makes
        them (ValueError otherwise). The model checks n against its own (see ``Detr``)."""
        final = [k for k in self.weight_dict if not _is_aux_key(k, self.weight_dict)]
        indices = [int(k.rsplit("_", 1)[1]) for k in self.weight_dict if k not in final]
        n = max(indices) + 1 if indices else 0
        missing = set(build_weight_dict(dict.fromkeys(final, 0.0), n)) - set(self.weight_dict)
        if missing:
            raise ValueError(
                f"weight_dict weights auxiliary layers up to _{n - 1} but lacks {sorted(missing)}: "
                "build it with build_weight_dict(base_weights, num_aux_layers)."
            )
        return n

    def _loss_table(self) -> dict[str, Callable]:
        return {"labels": self.loss_labels, "boxes": self.loss_boxes, "masks": self.loss_masks}

    # terms computed for every decoder layer at once in compute(), and the keys they give;
    # the others ("masks") on the final layer only
    _LAYER_TERMS = {"labels": ("loss_ce",), "boxes": ("loss_bbox", "loss_giou")}

    def loss_labels(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """``loss_ce`` of one decoder layer (:meth:`_class_losses`)."""
        matched = flatten_matches([indices], targets, outputs["pred_logits"].device)
        losses = self._class_losses(
            outputs["pred_logits"][None], outputs["pred_boxes"][None], matched, num_boxes
        )
        return {"loss_ce": losses[0]}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """``loss_bbox`` and ``loss_giou`` of one decoder layer (:meth:`_box_losses`)."""
        matched = flatten_matches([indices], targets, outputs["pred_boxes"].device)
        l1, giou = self._box_losses(outputs["pred_boxes"][None], matched, num_boxes)
        return {"loss_bbox": l1[0], "loss_giou": giou[0]}

    def _class_losses(
        self, logits: torch.Tensor, boxes: torch.Tensor, matched: "Matches", num_boxes: float
    ) -> torch.Tensor:
        """``loss_ce`` of L layers at once: logits [L, N, Q, K+1], boxes [L, N, Q, 4] -> [L].
        Cross-entropy over all queries; unmatched ones are "no object" (weight eos_coef). With a
        sigmoid ``class_loss``, see :meth:`_sigmoid_class_losses`."""
        logits = logits.float()
        layers = logits.shape[0]
        target_classes = torch.full(
            logits.shape[:3], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[matched.layer, matched.image, matched.query] = matched.labels
        if self.class_loss != "softmax":
            return self._sigmoid_class_losses(logits, boxes, matched, target_classes, num_boxes)
        # The official weighted mean, sum(w * ce) / sum(w), with sum(w) averaged over workers
        # like num_boxes: identical on one worker, and DDP's averaged gradients then equal those
        # of one big batch (a per-worker mean would weight workers by their share of matches).
        weighted_ce = F.cross_entropy(
            logits.flatten(0, 1).transpose(1, 2),
            target_classes.flatten(0, 1),
            self.empty_weight,
            reduction="none",
        )  # [L*N, Q], w * ce
        weight_sum = self.empty_weight[target_classes].view(layers, -1).sum(1)
        return weighted_ce.view(layers, -1).sum(1) / average_over_workers(weight_sum.detach())

    def _sigmoid_class_losses(
        self, logits, boxes, matched: "Matches", target_classes, num_boxes
    ) -> torch.Tensor:
        """Focal or IoU-aware BCE over the K class logits of every query, summed and divided by
        the number of target boxes (Deformable DETR's normalisation), per layer: [L]."""
        logits = logits[..., : self.num_classes]  # [L, N, Q, K]
        if self.class_loss == "focal":
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., : self.num_classes]
            terms = sigmoid_focal_terms(
                logits, onehot.to(logits), self.focal_alpha, self.focal_gamma
            )
            return terms.flatten(1).sum(1) / num_boxes
        # IA-BCE: positives' soft target t = p^alpha * IoU^(1-alpha); negatives weighted p^gamma
        prob = logits.sigmoid()
        query = (matched.layer, matched.image, matched.query)
        src_boxes = boxes[query].detach().float()
        iou = paired_generalized_box_iou(
            box_cxcywh_to_xyxy(src_boxes),
            box_cxcywh_to_xyxy(matched.boxes.to(src_boxes)),
            giou=False,
        ).clamp(min=0.01)
        positive = (*query, matched.labels)
        t = prob[positive].detach() ** self.focal_alpha * iou ** (1 - self.focal_alpha)
        pos_weights = torch.zeros_like(logits)
        neg_weights = prob.detach() ** self.focal_gamma
        pos_weights[positive] = t
        neg_weights[positive] = 1 - t
        loss = -pos_weights * F.logsigmoid(logits) - neg_weights * F.logsigmoid(-logits)
        return loss.flatten(1).sum(1) / num_boxes

    def _box_losses(
        self, boxes: torch.Tensor, matched: "Matches", num_boxes: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 and GIoU losses of the matched boxes of L layers at once (boxes [L, N, Q, 4]),
        normalised by the number of target boxes: two [L] tensors."""
        src_boxes = boxes[matched.layer, matched.image, matched.query].float()  # [M, 4]
        target_boxes = matched.boxes.to(src_boxes)
        l1 = F.l1_loss(src_boxes, target_boxes, reduction="none").sum(1)
        giou = 1 - paired_generalized_box_iou(
            box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)
        )
        per_layer = torch.zeros(boxes.shape[0], 2, dtype=l1.dtype, device=l1.device)
        per_layer = per_layer.index_add(0, matched.layer, torch.stack([l1, giou], 1))
        return per_layer[:, 0] / num_boxes, per_layer[:, 1] / num_boxes

    def loss_masks(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """Sigmoid focal (``loss_mask``) and Dice (``loss_dice``) losses of the matched masks.

        As the official code: target masks are zero-padded to the batch's largest H, W and the
        predicted logits are upsampled (bilinear, ``align_corners=False``) to that size.
        """
        matched = flatten_matches([indices], targets, outputs["pred_masks"].device)
        pred_masks = outputs["pred_masks"][matched.image, matched.query].float()  # [M, H4, W4]
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        gt_masks = torch.cat(
            [
                pad_masks(t["masks"][j].to(pred_masks), height, width)
                for t, (_, j) in zip(targets, indices)
            ]
        )  # [M, H, W]
        pred_masks = F.interpolate(
            pred_masks[:, None], size=(height, width), mode="bilinear", align_corners=False
        )[:, 0]
        pred_masks, gt_masks = pred_masks.flatten(1), gt_masks.flatten(1)
        return {
            "loss_mask": sigmoid_focal_loss(pred_masks, gt_masks, num_boxes),
            "loss_dice": dice_loss(pred_masks, gt_masks, num_boxes),
        }

    @torch.no_grad()
    def metrics(self, outputs, targets, indices) -> dict[str, float]:
        """Diagnostics of one decoder layer (not losses): ``class_error`` (% of matched queries
        whose top class is wrong, 100 when nothing is matched) and ``cardinality_error`` (mean
        absolute difference between the number of predicted objects and targets; a prediction
        is an object when its top logit is not "no object", or with a sigmoid ``class_loss``
        when its top class probability exceeds 0.5)."""
        logits = outputs["pred_logits"]
        if self.class_loss != "softmax":
            logits = logits[..., : self.num_classes]
        matched = flatten_matches([indices], targets, logits.device)
        if matched.labels.numel() == 0:
            class_error = 100.0
        else:
            correct = logits[matched.image, matched.query].argmax(-1) == matched.labels
            class_error = 100.0 - 100.0 * correct.float().mean().item()
        if self.class_loss == "softmax":
            num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        else:
            num_pred = (logits.max(-1).values > 0).sum(1).float()
        num_gt = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"class_error": class_error, "cardinality_error": F.l1_loss(num_pred, num_gt).item()}

    def compute(
        self,
        outputs,
        targets,
        num_groups: int = 1,
        losses: Sequence[str] = (),
        identity_matches: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], list[Indices]]:
        """Unweighted losses of every layer, last-layer metrics, and the matches of every layer
        (last layer first, then the auxiliary layers in order).

        With ``num_groups`` G > 1 (Group DETR), ``outputs`` hold G independent query groups
        stacked group-major along the batch ([G*N, Q, ...], entry g*N + i is group g of image
        i): each group is matched one-to-one to the N images' targets, and every loss is the
        mean over groups (normalised by G times the box count). Metrics are those of group 0,
        the queries inference uses. ``losses`` overrides ``self.losses`` (default: all).
        ``identity_matches``: no Hungarian matching, query j is target j of its image (the
        denoising queries, built from the targets in order)."""
        n = len(targets)
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device) * num_groups
        targets_all = list(targets) * num_groups
        gt_classes, gt_boxes = [t["labels"] for t in targets_all], [t["boxes"] for t in targets_all]
        layers = [(outputs, "")] + [
            (aux, f"_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))
        ]
        all_indices = self._match([o for o, _ in layers], gt_classes, gt_boxes, identity_matches)
        # box and class terms of all layers in one pass (few large ops instead of many small)
        names = losses or self.losses
        per_layer: dict[str, torch.Tensor] = {}
        if "labels" in names or "boxes" in names:
            logits = torch.stack([o["pred_logits"] for o, _ in layers])
            boxes = torch.stack([o["pred_boxes"] for o, _ in layers])
            matched = flatten_matches(all_indices, targets_all, logits.device)
            if "labels" in names:
                per_layer["loss_ce"] = self._class_losses(logits, boxes, matched, num_boxes)
            if "boxes" in names:
                per_layer["loss_bbox"], per_layer["loss_giou"] = self._box_losses(
                    boxes, matched, num_boxes
                )
        result = {}
        for layer, ((layer_outputs, suffix), indices) in enumerate(zip(layers, all_indices)):
            for name in names:
                if name in self._LAYER_TERMS:
                    result.update(
                        {k + suffix: per_layer[k][layer] for k in self._LAYER_TERMS[name]}
                    )
                elif not suffix:  # final layer only
                    terms = self._loss_table()[name](layer_outputs, targets_all, indices, num_boxes)
                    result.update(terms)
        group0 = {k: outputs[k][:n] for k in ("pred_logits", "pred_boxes")}
        metrics = self.metrics(group0, targets, all_indices[0][:n])
        return result, metrics, all_indices

    def _match(self, layers: list[dict], gt_classes, gt_boxes, identity: bool) -> list[Indices]:
        """The matches of every layer's outputs; with ``identity`` query j is target j."""
        if identity:
            pairs = [(torch.arange(len(c)), torch.arange(len(c))) for c in gt_classes]
            return [pairs] * len(layers)
        # all layers matched together: one device-to-host transfer per batch
        return self.matcher.match_layers(
            torch.stack([o["pred_logits"].detach() for o in layers]),
            torch.stack([o["pred_boxes"].detach() for o in layers]),
            gt_classes,
            gt_boxes,
        )

    def forward(self, outputs, targets) -> dict[str, torch.Tensor]:
        """Weighted losses of one set of predictions (plain DETR): :meth:`branch_losses` of the
        single branch ``LossBranch("", outputs, targets)``."""
        return self.branch_losses([LossBranch("", outputs, targets)])

    def branch_losses(self, branches: Sequence["LossBranch"]) -> dict[str, torch.Tensor]:
        """Weighted losses of every branch, keys suffixed with the branch's ``suffix``: a set
        branch's terms weighted by ``weight_dict`` times ``branch.weight``, a branch with a loss
        of its own by ``branch.weight``. The first branch is the main one (the queries inference
        uses): its last-layer metrics go to the event storage."""
        weighted = {}
        for index, branch in enumerate(branches):
            if branch.loss is not None:
                losses = branch.loss(branch.outputs, branch.targets)
                weighted.update({k + branch.suffix: v * branch.weight for k, v in losses.items()})
                continue
            losses, metrics, _ = self.compute(
                branch.outputs,
                branch.targets,
                num_groups=branch.num_groups,
                losses=branch.terms,
                identity_matches=branch.identity_matches,
            )
            if index == 0:
                storage = get_event_storage()
                for name, value in metrics.items():
                    storage.put_scalar(name, value)
            weighted.update(
                {
                    k + branch.suffix: v * self.weight_dict[k] * branch.weight
                    for k, v in losses.items()
                }
            )
        return weighted

    def extra_repr(self) -> str:
        base = {k: v for k, v in self.weight_dict.items() if not k[-1].isdigit()}
        return f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, weights={base}"


def pad_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[G, h, w] -> [G, height, width], zero-padded at the bottom and right."""
    return F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]))


def criterion_targets(
    batched_inputs: list[dict],
    device: torch.device,
    with_masks: bool = False,
    padded_size: tuple[int, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Ground truth of Detectron2 inputs (``instances`` with ``gt_boxes`` xyxy pixels and
    ``gt_classes``) in the criterion's format: ``labels [G]`` and ``boxes [G, 4]`` cxcywh
    normalized by the unpadded image size; ``with_masks`` also ``masks`` (uint8 [G, H, W])
    zero-padded to ``padded_size`` (default: the image's own size)."""
    targets = []
    for x in batched_inputs:
        instances = x["instances"].to(device)
        height, width = instances.image_size
        scale = torch.as_tensor([width, height, width, height], dtype=torch.float32, device=device)
        boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor.float() / scale)
        target = {"labels": instances.gt_classes, "boxes": boxes}
        if with_masks:
            target["masks"] = gt_mask_tensor(instances, padded_size or (height, width), device)
        targets.append(target)
    return targets


def _is_aux_key(key: str, weight_dict: dict[str, float]) -> bool:
    """Whether ``key`` is ``<final-layer key>_<i>``, the weight of an auxiliary layer's term."""
    base, _, index = key.rpartition("_")
    return index.isdigit() and base in weight_dict


def build_weight_dict(base: dict[str, float], num_aux_layers: int) -> dict[str, float]:
    """Weights of the final layer's terms, repeated for every auxiliary layer (suffix ``_{i}``)."""
    weights = dict(base)
    for i in range(num_aux_layers):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def build_criterion(cfg, num_classes: int, num_aux_layers: int) -> SetCriterion:
    """The set criterion of ``cfg``: the Hungarian matcher of ``MODEL.DETR.MATCHER``, the
    ``MODEL.DETR.LOSS`` weights of the final and the ``num_aux_layers`` auxiliary decoder
    layers, and the mask terms with ``MODEL.MASK_ON``."""
    loss, costs = cfg.MODEL.DETR.LOSS, cfg.MODEL.DETR.MATCHER
    # the sigmoid class losses match with the focal cost (Deformable DETR)
    class_cost = "softmax" if loss.CLASS_LOSS == "softmax" else "focal"
    matcher = HungarianMatcher(
        cost_class=costs.COST_CLASS,
        cost_bbox=costs.COST_BBOX,
        cost_giou=costs.COST_GIOU,
        class_cost=class_cost,
        focal_alpha=loss.FOCAL_ALPHA,
        focal_gamma=loss.FOCAL_GAMMA,
    )
    base_weights = {
        "loss_ce": loss.CLASS_WEIGHT,
        "loss_bbox": loss.L1_WEIGHT,
        "loss_giou": loss.GIOU_WEIGHT,
    }
    losses = ("labels", "boxes")
    if cfg.MODEL.MASK_ON:
        base_weights.update(loss_mask=loss.MASK_WEIGHT, loss_dice=loss.DICE_WEIGHT)
        losses += ("masks",)
    return SetCriterion(
        num_classes,
        matcher=matcher,
        weight_dict=build_weight_dict(base_weights, num_aux_layers),
        eos_coef=loss.NO_OBJECT_WEIGHT,
        losses=losses,
        class_loss=loss.CLASS_LOSS,
        focal_alpha=loss.FOCAL_ALPHA,
        focal_gamma=loss.FOCAL_GAMMA,
    )
