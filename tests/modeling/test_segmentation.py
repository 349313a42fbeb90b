"""The mask head (MODEL.MASK_ON): shapes, attention maps, losses, freezing for stage 2, and the
inference outputs of a tiny model without weights."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from detr_d2.modeling.criterion import SetCriterion, build_weight_dict
from detr_d2.modeling.matcher import HungarianMatcher
from detr_d2.modeling.segmentation import MaskAttentionMap, MaskHead, dice_loss, sigmoid_focal_loss
from detr_d2.solver import build_detr_optimizer

from helpers import build_model_no_weights, segm_cfg, tiny_cfg

MASK_PARAMS = ("bbox_attention.", "mask_head.")


def training_input(
    height=48, width=64, boxes=((4, 6, 30, 40), (20, 10, 60, 46)), classes=(0, 2), polygons=False
):
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if polygons:
        instances.gt_masks = PolygonMasks(
            [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes]
        )
    else:
        masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):
            mask[y0:y1, x0:x1] = True
        instances.gt_masks = BitMasks(masks)
    return {
        "image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8),
        "instances": instances,
    }


def test_attention_map_is_one_softmax_per_query_over_heads_and_positions():
    """Official MHAttentionMap: one softmax over all heads and positions; padding gets 0."""
    torch.manual_seed(0)
    attention = MaskAttentionMap(16, 4)
    padding = torch.zeros(2, 3, 5, dtype=torch.bool)
    padding[1, :, 4] = True
    weights = attention(torch.randn(2, 7, 16), torch.randn(2, 16, 3, 5), padding)
    assert weights.shape == (2, 7, 4, 3, 5)
    assert torch.allclose(weights.flatten(2).sum(-1), torch.ones(2, 7))
    assert weights[1, :, :, :, 4].abs().max() == 0


def test_mask_head_output_shape_and_narrow_group_norms():
    head = MaskHead(hidden_dim=64, num_heads=4, fpn_channels=[32, 16, 8])  # widths 32, 16, 8, 4
    assert head.gn5.num_groups == 4 and head.gn1.num_groups == 4  # 68 channels: gcd(8, 68)
    fpn = [torch.randn(2, 32, 6, 8), torch.randn(2, 16, 12, 16), torch.randn(2, 8, 24, 32)]
    out = head(torch.randn(2, 64, 3, 4), torch.rand(2, 5, 4, 3, 4), fpn)
    assert out.shape == (2, 5, 24, 32)


def test_official_width_names_and_shapes():
    head = MaskHead(hidden_dim=256, num_heads=8, fpn_channels=[1024, 512, 256])
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes["lay1.weight"] == (264, 264, 3, 3) and shapes["out_lay.weight"] == (1, 16, 3, 3)
    assert shapes["adapter1.weight"] == (128, 1024, 1, 1) and shapes["adapter3.weight"] == (
        32,
        256,
        1,
        1,
    )
    assert head.gn1.num_groups == 8 and head.gn5.num_groups == 8


def test_mask_losses_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.0, 3.0]])
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    p = logits.sigmoid()
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert dice_loss(logits, target, 2.0).item() == pytest.approx(dice.item() / 2, abs=1e-6)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = (
        alpha_t
        * F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        * (1 - p_t) ** 2
    ).mean()
    assert sigmoid_focal_loss(logits, target, 2.0).item() == pytest.approx(
        focal.item() / 2, abs=1e-6
    )


def test_mask_loss_pads_targets_and_skips_aux_layers():
    """Targets of different sizes are zero-padded to the largest; no loss_mask_{i}."""
    criterion = SetCriterion(
        2,
        HungarianMatcher(),
        build_weight_dict(
            {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2, "loss_mask": 1, "loss_dice": 1}, 1
        ),
        eos_coef=0.1,
        losses=("labels", "boxes", "masks"),
    )
    box = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    outputs = {
        "pred_logits": torch.zeros(2, 3, 3),
        "pred_boxes": torch.full((2, 3, 4), 0.5),
        "pred_masks": torch.zeros(2, 3, 4, 5, requires_grad=True),
    }
    outputs["aux_outputs"] = [
        {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    ]
    targets = [
        {
            "labels": torch.tensor([0]),
            "boxes": box,
            "masks": torch.ones(1, 16, 20, dtype=torch.uint8),
        },
        {
            "labels": torch.tensor([1]),
            "boxes": box,
            "masks": torch.ones(1, 10, 12, dtype=torch.uint8),
        },
    ]
    losses, _, _ = criterion.compute(outputs, targets)
    assert "loss_mask" in losses and "loss_dice" in losses and "loss_mask_0" not in losses
    # zero logits (p = 0.5): dice of a full 16x20 mask and of a 10x12 mask padded to 16x20
    expected = sum(1 - (2 * 0.5 * n + 1) / (0.5 * 320 + n + 1) for n in (320, 120)) / 2
    assert losses["loss_dice"].item() == pytest.approx(expected, abs=1e-5)
    losses["loss_dice"].backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0


@pytest.mark.parametrize("polygons", [False, True])
def test_training_step_with_masks_and_empty_ground_truth(polygons):
    model = build_model_no_weights(segm_cfg())
    model.train()
    inputs = [training_input(polygons=polygons), training_input(40, 56, boxes=(), classes=())]
    with EventStorage():
        losses = model(inputs)
    assert {"loss_mask", "loss_dice", "loss_ce_0"} <= set(losses) and "loss_mask_0" not in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.mask_head.out_lay.weight.grad.abs().sum() > 0
    assert model.backbone.res5[0].conv1.weight.grad is not None  # not frozen: everything trains


def test_frozen_detr_trains_only_the_mask_head():
    cfg = segm_cfg(FREEZE_DETR=True)
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model_no_weights(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(MASK_PARAMS) for n in trainable)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    model.train()
    with EventStorage():
        losses = model([training_input()])
    sum(losses.values()).backward()
    for name, parameter in model.named_parameters():
        if name.startswith(MASK_PARAMS):
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name
    optimizer = build_detr_optimizer(cfg, model)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n.startswith(MASK_PARAMS)}


def test_frozen_model_keeps_the_stage1_predictions():
    """Stage-1 weights (trained batch norm) load into the frozen stage-2 model unchanged."""
    stage1_cfg = tiny_cfg()
    stage1_cfg.MODEL.RESNETS.NORM = "BN"
    stage1 = build_model_no_weights(stage1_cfg)
    for module in stage1.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    stage2_cfg = segm_cfg(FREEZE_DETR=True)
    stage2_cfg.MODEL.RESNETS.NORM = "BN"
    stage2 = build_model(stage2_cfg)
    incompatible = stage2.load_state_dict(stage1.state_dict(), strict=False)
    assert all(k.startswith(MASK_PARAMS) for k in incompatible.missing_keys)
    image = [{"image": torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)}]
    ours, theirs = stage2.eval().predict_raw(image), stage1.eval().predict_raw(image)
    assert torch.allclose(ours["pred_logits"], theirs["pred_logits"], atol=1e-5)
    assert torch.allclose(ours["pred_boxes"], theirs["pred_boxes"], atol=1e-6)


def test_inference_outputs():
    cfg = segm_cfg()
    cfg.MODEL.DETR.TEST.update(PANOPTIC_ON=True, SEMANTIC_ON=True, PANOPTIC_THRESHOLD=0.0)
    model = build_model_no_weights(cfg).eval()
    image = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8)
    with torch.no_grad():
        raw = model.predict_raw([{"image": image}])
        (output,) = model([{"image": image, "height": 80, "width": 104}])
    assert raw["pred_masks"].shape == (1, 7, 10, 13)  # 1/4 of the input
    instances = output["instances"]
    assert (
        len(instances) == 7
        and instances.pred_masks.shape == (7, 80, 104)
        and instances.pred_masks.dtype == torch.bool
    )
    assert output["sem_seg"].shape == (3, 80, 104)
    segment_ids, segments_info = output["panoptic_seg"]
    assert segment_ids.shape == (80, 104) and segment_ids.dtype == torch.int32
    assert sorted(segment_ids.unique().tolist()) == [s["id"] for s in segments_info]
    assert all(s["isthing"] for s in segments_info)  # no stuff classes known: all things


@pytest.mark.parametrize(
    "change,message",
    [
        ({"MODEL.DETR.FREEZE_DETR": True, "MODEL.MASK_ON": False}, "MODEL.MASK_ON"),
        ({"MODEL.DETR.TEST.PANOPTIC_ON": True, "MODEL.MASK_ON": False}, "MODEL.MASK_ON"),
        ({"MODEL.RESNETS.OUT_FEATURES": ["res5"]}, "MODEL.RESNETS.OUT_FEATURES"),
    ],
)
def test_invalid_segmentation_settings_fail_with_the_key(change, message):
    cfg = segm_cfg()
    for key, value in change.items():
        node, name = cfg, key.split(".")
        for part in name[:-1]:
            node = node[part]
        node[name[-1]] = value
    with pytest.raises(ValueError, match=message):
        build_model(cfg)
