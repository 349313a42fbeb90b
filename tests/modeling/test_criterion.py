import pytest
import torch
import torch.nn.functional as F
from detectron2.utils.events import EventStorage
from torchvision.ops import generalized_box_iou

from detr_d2.modeling.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from detr_d2.modeling.criterion import SetCriterion, build_weight_dict
from detr_d2.modeling.matcher import HungarianMatcher

BASE = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def make_criterion(num_classes=2, num_aux=0):
    return SetCriterion(
        num_classes, HungarianMatcher(), build_weight_dict(BASE, num_aux), eos_coef=0.1
    )


def test_hand_computed_losses():
    """One image, 2 queries, 1 target: query 0 predicts the target box exactly."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}]
    losses, metrics, indices = make_criterion().compute(
        {"pred_logits": logits, "pred_boxes": boxes}, targets
    )
    assert indices[0][0][0].tolist() == [0]
    # weighted CE: query 0 -> class 0 (weight 1), query 1 -> no-object (weight 0.1)
    log_p = F.log_softmax(logits[0], -1)
    expected_ce = -(1.0 * log_p[0, 0] + 0.1 * log_p[1, 2]) / 1.1
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), abs=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics == {"class_error": 0.0, "cardinality_error": 0.0}


def test_box_losses_normalised_by_num_boxes():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]], [[0.5, 0.5, 0.2, 0.2]]])
    logits = torch.zeros(2, 1, 3)
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    losses, _, _ = make_criterion().compute({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, abs=1e-6)  # |0.6 - 0.5| over 1 box
    xyxy = box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]]))
    giou = generalized_box_iou(xyxy[:1], xyxy[1:])[0, 0]
    assert losses["loss_giou"].item() == pytest.approx(1 - giou.item(), abs=1e-6)


def test_paired_giou_equals_diagonal():
    g = torch.Generator().manual_seed(0)
    a = box_cxcywh_to_xyxy(torch.rand(30, 4, generator=g) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(30, 4, generator=g) * 0.5 + 0.1)
    assert torch.allclose(
        paired_generalized_box_iou(a, b), torch.diag(generalized_box_iou(a, b)), atol=1e-6
    )
    # broadcast: every box of a against every box of b, the pairwise matrix
    torch.testing.assert_close(
        paired_generalized_box_iou(a[:, None], b[None]), generalized_box_iou(a, b)
    )


def test_empty_targets_everything_is_no_object():
    logits = torch.randn(2, 4, 3, requires_grad=True)
    boxes = torch.rand(2, 4, 4, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    losses, metrics, _ = make_criterion().compute(outputs, [empty, empty])
    expected_ce = F.cross_entropy(logits.transpose(1, 2), torch.full((2, 4), 2))
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert metrics["class_error"] == 100.0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()


def test_forward_weights_aux_terms_and_logs_diagnostics():
    g = torch.Generator().manual_seed(1)

    def layer():
        return {
            "pred_logits": torch.randn(1, 5, 3, generator=g),
            "pred_boxes": torch.rand(1, 5, 4, generator=g) * 0.5 + 0.2,
        }

    outputs = dict(layer(), aux_outputs=[layer(), layer()])
    targets = [
        {
            "labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]]),
        }
    ]
    criterion = make_criterion(num_aux=2)
    raw, _, _ = criterion.compute(outputs, targets)
    with EventStorage() as storage:
        weighted = criterion(outputs, targets)
        logged = storage.latest()
    assert set(weighted) == {f"{k}{s}" for k in BASE for s in ("", "_0", "_1")}
    for key, value in weighted.items():
        assert value.item() == pytest.approx(
            raw[key].item() * BASE[key.rsplit("_", 1)[0] if key[-1].isdigit() else key]
        )
    assert "class_error" in logged and "cardinality_error" in logged
    assert not any(k.startswith(("class_error", "cardinality")) for k in weighted)


def test_unknown_loss_term_rejected():
    with pytest.raises(ValueError, match="Unknown DETR loss"):
        SetCriterion(2, HungarianMatcher(), BASE, 0.1, losses=("labels", "masks_typo"))


def _layer_reference(logits, boxes, targets, indices, num_boxes, class_loss, eos_coef=0.1):
    """One layer's loss_ce, loss_bbox, loss_giou restated image by image, pair by pair."""
    k = logits.shape[-1] - 1
    ce_sum = weight_sum = l1 = giou = cls = 0.0
    for i, (src, tgt) in enumerate(indices):
        classes = torch.full((logits.shape[1],), k)
        classes[src] = targets[i]["labels"][tgt]
        weights = torch.where(classes == k, eos_coef, 1.0)
        ce_sum += (weights * F.cross_entropy(logits[i], classes, reduction="none")).sum()
        weight_sum += weights.sum()
        for q, t in zip(src.tolist(), tgt.tolist()):
            pred, target = boxes[i, q], targets[i]["boxes"][t]
            l1 += (pred - target).abs().sum()
            giou += (
                1
                - generalized_box_iou(
                    box_cxcywh_to_xyxy(pred[None]), box_cxcywh_to_xyxy(target[None])
                )[0, 0]
            )
        if class_loss == "focal":
            onehot = F.one_hot(classes, k + 1)[:, :k].float()
            p = logits[i, :, :k].sigmoid()
            p_t = p * onehot + (1 - p) * (1 - onehot)
            alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
            bce = F.binary_cross_entropy_with_logits(logits[i, :, :k], onehot, reduction="none")
            cls += (alpha_t * bce * (1 - p_t) ** 2).sum()
    ce = ce_sum / weight_sum if class_loss == "softmax" else cls / num_boxes
    return {"loss_ce": ce, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}


@pytest.mark.parametrize("class_loss", ["softmax", "focal"])
def test_all_layers_and_groups_in_one_pass_equal_each_layer_alone(class_loss):
    """compute() takes the box and class terms of every layer and query group in one batched
    pass: each layer's terms equal that layer's restated alone, with that layer's matches."""
    torch.manual_seed(0)
    groups, n, q, k, aux = 3, 2, 5, 3, 2
    targets = [
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
    ]

    def layer():
        return {
            "pred_logits": torch.randn(groups * n, q, k + 1),
            "pred_boxes": torch.rand(groups * n, q, 4) * 0.5 + 0.25,
        }

    outputs = dict(layer(), aux_outputs=[layer() for _ in range(aux)])
    criterion = SetCriterion(
        k,
        HungarianMatcher(class_cost="focal" if class_loss == "focal" else "softmax"),
        build_weight_dict(BASE, aux),
        eos_coef=0.1,
        class_loss=class_loss,
    )
    losses, _, indices = criterion.compute(outputs, targets, num_groups=groups)
    num_boxes = 3.0 * groups
    for i, layer_outputs in enumerate([outputs, *outputs["aux_outputs"]]):
        suffix = "" if i == 0 else f"_{i - 1}"
        expected = _layer_reference(
            layer_outputs["pred_logits"],
            layer_outputs["pred_boxes"],
            targets * groups,
            indices[i],
            num_boxes,
            class_loss,
        )
        for key, value in expected.items():
            torch.testing.assert_close(
                losses[key + suffix], torch.as_tensor(value), rtol=1e-5, atol=1e-6
            )
