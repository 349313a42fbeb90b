import pytest
import torch

from detr_d2.modeling.matcher import HungarianMatcher


def random_batch(num_images, num_queries, num_classes, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_images, num_queries, num_classes + 1, generator=g)
    boxes = torch.rand(num_images, num_queries, 4, generator=g) * 0.5 + 0.1
    gt_classes = [torch.randint(0, num_classes, (n,), generator=g) for n in sizes]
    gt_boxes = [torch.rand(n, 4, generator=g) * 0.5 + 0.1 for n in sizes]
    return logits, boxes, gt_classes, gt_boxes


def test_batched_equals_per_image():
    matcher = HungarianMatcher(1, 5, 2)
    logits, boxes, gt_classes, gt_boxes = random_batch(4, 20, 5, [3, 0, 7, 1])
    batched = matcher(logits, boxes, gt_classes, gt_boxes)
    for i in range(4):
        (single,) = matcher(
            logits[i : i + 1], boxes[i : i + 1], gt_classes[i : i + 1], gt_boxes[i : i + 1]
        )
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])


def test_all_layers_at_once_equal_layer_by_layer():
    matcher = HungarianMatcher(1, 5, 2)
    layers = [random_batch(3, 12, 4, [2, 0, 5], seed=s) for s in range(4)]
    gt_classes, gt_boxes = layers[0][2], layers[0][3]
    together = matcher.match_layers(
        torch.stack([b[0] for b in layers]),
        torch.stack([b[1] for b in layers]),
        gt_classes,
        gt_boxes,
    )
    for (logits, boxes, _, _), indices in zip(layers, together):
        for (src, tgt), (ref_src, ref_tgt) in zip(
            indices, matcher(logits, boxes, gt_classes, gt_boxes)
        ):
            assert torch.equal(src, ref_src) and torch.equal(tgt, ref_tgt)


def test_empty_targets_give_empty_matches():
    matcher = HungarianMatcher()
    logits, boxes, gt_classes, gt_boxes = random_batch(2, 10, 3, [0, 0])
    for pred_idx, gt_idx in matcher(logits, boxes, gt_classes, gt_boxes):
        assert pred_idx.numel() == 0 and gt_idx.numel() == 0
        assert pred_idx.dtype == torch.int64


@pytest.mark.parametrize("num_queries,num_targets", [(10, 3), (4, 9), (5, 5)])
def test_one_to_one_min_q_g(num_queries, num_targets):
    logits, boxes, gt_classes, gt_boxes = random_batch(1, num_queries, 4, [num_targets])
    ((pred_idx, gt_idx),) = HungarianMatcher()(logits, boxes, gt_classes, gt_boxes)
    assert len(pred_idx) == len(gt_idx) == min(num_queries, num_targets)
    assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(gt_idx.tolist())) == len(gt_idx)


def test_hand_made_assignment():
    """Query 1 sits on target 0 and query 0 on target 1: the matcher must cross them over,
    although greedy matching in query order would pair query 0 with target 0."""
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.5, 0.1, 0.05, 0.05]]])
    logits = torch.zeros(1, 3, 3)  # uniform class probabilities: boxes decide
    gt_boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])]
    gt_classes = [torch.tensor([0, 1])]
    ((pred_idx, gt_idx),) = HungarianMatcher()(logits, boxes, gt_classes, gt_boxes)
    assert dict(zip(pred_idx.tolist(), gt_idx.tolist())) == {0: 1, 1: 0}


def test_class_cost_breaks_ties():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])  # identical boxes
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])  # query 0 says class 0
    ((pred_idx, gt_idx),) = HungarianMatcher()(logits, boxes, [torch.tensor([1])], [boxes[0, :1]])
    assert pred_idx.tolist() == [1] and gt_idx.tolist() == [0]


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="COST"):
        HungarianMatcher(0, 0, 0)


def test_non_finite_predictions_named():
    logits, boxes, gt_classes, gt_boxes = random_batch(1, 5, 2, [2])
    logits[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="pred_logits"):
        HungarianMatcher()(logits, boxes, gt_classes, gt_boxes)
