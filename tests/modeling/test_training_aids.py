"""Training-only convergence aids: query groups, one-to-many queries, denoising queries, sigmoid
class losses, the dense head and the weight EMA. Inference must stay plain DETR."""

import itertools

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import EventStorage
from detr_tools.benchmark import synthetic_batch

from detr_d2.ema import WeightEMA
from detr_d2.engine import build_step_trainer
from detr_d2.modeling.criterion import LossBranch, SetCriterion, build_weight_dict
from detr_d2.modeling.inference_graph import inference_model
from detr_d2.modeling.matcher import HungarianMatcher
from detr_d2.modeling.training_aids import (
    DecoderQueries,
    DenoisingQueries,
    DenseAuxHead,
    OneToManyQueries,
    QueryGroups,
    block_diagonal_mask,
)
from detr_d2.solver import build_detr_optimizer

from helpers import build_model_no_weights, tiny_cfg


def accelerated_cfg(class_loss="ia_bce"):
    cfg = tiny_cfg("MODEL.DETR.LOSS.CLASS_LOSS", class_loss)
    cfg.MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS = 3
    cfg.MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.NUM_QUERIES = 12
    cfg.MODEL.DETR.TRAINING_AIDS.DENSE_AUX.ENABLED = True
    cfg.MODEL.DETR.TRAINING_AIDS.DENOISING.GROUPS = 2
    return cfg


def batch(n=2, seed=1):
    return synthetic_batch(n, 96, 128, num_classes=3, seed=seed, with_targets=True)


def test_self_attention_mask_is_block_diagonal():
    groups = QueryGroups(hidden_dim=8, num_queries=2, num_groups=3)
    one_to_many = OneToManyQueries(hidden_dim=8, num_queries=3, repeat=6, loss_weight=1.0)
    plain = torch.zeros(2, 8)
    queries = DecoderQueries.assemble(plain, [groups.queries([]), one_to_many.queries([])])
    sets = [0, 0, 1, 1, 2, 2, 3, 3, 3]
    expected = torch.tensor([[a != b for b in sets] for a in sets])
    assert torch.equal(queries.attention_mask, expected)
    assert queries.spans == [slice(2, 6), slice(6, 9)] and queries.content is None
    assert torch.equal(queries.position, torch.cat([plain, groups.weight, one_to_many.weight]))


def test_group_zero_computes_what_plain_detr_computes():
    """The mask blocks all cross-set attention: group 0's training outputs equal the plain
    model's outputs with the same weights, whatever the other sets' queries are (the other
    groups, the one-to-many set and the denoising queries)."""
    cfg = accelerated_cfg("softmax")
    cfg.MODEL.DETR.TRAINING_AIDS.DENSE_AUX.ENABLED = False
    model = build_model_no_weights(cfg).train()
    plain = build_model_no_weights(tiny_cfg()).train()
    plain.load_state_dict(model.state_dict(), strict=False)
    inputs = batch()
    images = model.preprocess_image(inputs)
    targets = model.prepare_targets(inputs)

    def branch_outputs():
        branches = model.loss_branches(images, targets)
        assert [b.suffix for b in branches] == ["", "_o2m", "_dn"]
        return [b.outputs for b in branches]

    with torch.no_grad():
        grouped, grouped_o2m, grouped_dn = branch_outputs()
        reference = plain.forward_heads(images)
        model.train_only["queries"].group_embed.weight.normal_()  # other groups change ...
        model.train_only["denoising"].label_embed.weight.normal_()
        regrouped, regrouped_o2m, _ = branch_outputs()
    n = len(images)
    assert grouped_dn["pred_boxes"].shape == (
        2 * n,
        max(len(t["labels"]) for t in targets),
        4,
    )
    for outputs, one_to_many in ((grouped, grouped_o2m), (regrouped, regrouped_o2m)):
        # ... group 0 does not
        torch.testing.assert_close(
            outputs["pred_logits"][:n], reference["pred_logits"], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            outputs["pred_boxes"][:n], reference["pred_boxes"], atol=1e-5, rtol=0
        )
        assert outputs["pred_logits"].shape[0] == 3 * n
        assert one_to_many["pred_logits"].shape[:2] == (n, 12)
    assert not torch.allclose(grouped["pred_logits"][n:], regrouped["pred_logits"][n:])


def test_each_aid_branch_is_the_criterion_on_its_own_queries():
    """Through the aid interface, with every aid on: each loss branch is the criterion applied
    directly to that aid's queries, sliced by hand from the decoder's output. The plain keys are
    the mean of the G groups' one-to-one losses, ``_o2m`` the loss against every target
    repeated k times, ``_dn`` the mean over the denoising groups with query j matched to target
    j, the dense keys the head's own losses on the encoder output; each times its weight."""
    cfg = accelerated_cfg("softmax")
    cfg.MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.WEIGHT = 0.5
    cfg.MODEL.DETR.TRAINING_AIDS.DENOISING.WEIGHT = 0.25
    cfg.MODEL.DETR.TRAINING_AIDS.DENSE_AUX.WEIGHT = 2.0
    model = build_model_no_weights(cfg).train()
    inputs = batch()
    images = model.preprocess_image(inputs)
    targets = model.prepare_targets(inputs)
    decoded = []
    model.transformer.register_forward_hook(lambda module, args, output: decoded.append(output))
    criterion = model.criterion
    with EventStorage(0):
        losses = criterion.branch_losses(model.loss_branches(images, targets))
        ((hs, memory),) = decoded
        logits, boxes = model.class_embed(hs), model.bbox_embed(hs).sigmoid()  # [L, N, T, ...]

        def loss_of(first, count, targets, groups=1, weight=1.0, **options):
            """Mean of the weighted losses of ``groups`` consecutive sets of ``count`` queries."""
            total = {}
            for group in range(groups):
                sets = slice(first + group * count, first + (group + 1) * count)
                outputs = {
                    "pred_logits": logits[-1, :, sets],
                    "pred_boxes": boxes[-1, :, sets],
                    "aux_outputs": [
                        {"pred_logits": a[:, sets], "pred_boxes": b[:, sets]}
                        for a, b in zip(logits[:-1], boxes[:-1])
                    ],
                }
                unweighted, _, _ = criterion.compute(outputs, targets, **options)
                for key, value in unweighted.items():
                    total[key] = total.get(key, 0) + value * criterion.weight_dict[key] * weight
            return {key: value / groups for key, value in total.items()}

        k, per_group = 6, max(len(t["labels"]) for t in targets)
        assert logits.shape[2] == 3 * 7 + 12 + 2 * per_group
        repeated = [
            {"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets
        ]
        head = model.train_only["dense_head"]
        stride = images.tensor.shape[-1] / memory.shape[-1]
        padding = model.padding_mask(images, memory.shape[-2:])
        dense = head.losses(*head(memory), padding, targets, images.image_sizes, stride)
        expected = {
            **loss_of(0, 7, targets, groups=3),
            **{
                f"{key}_o2m": value
                for key, value in loss_of(
                    21, 12, repeated, weight=0.5, losses=("boxes", "labels")
                ).items()
            },
            **{
                f"{key}_dn": value
                for key, value in loss_of(
                    33,
                    per_group,
                    targets,
                    2,
                    0.25,
                    losses=("labels", "boxes"),
                    identity_matches=True,
                ).items()
            },
            **{key: 2.0 * value for key, value in dense.items()},
        }
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_denoising_mask_keeps_every_set_to_itself():
    mask = block_diagonal_mask([2, 1, 3], torch.device("cpu"))
    sets = [0, 0, 1, 2, 2, 2]
    assert torch.equal(mask, torch.tensor([[a != b for b in sets] for a in sets]))


def test_denoising_noise_stays_within_its_bounds():
    torch.manual_seed(0)
    dn = DenoisingQueries(
        hidden_dim=16, num_classes=5, num_groups=3, box_noise=0.4, label_noise=0.5
    )
    boxes = torch.rand(4, 4) * 0.3 + torch.tensor([0.35, 0.35, 0.1, 0.1])
    targets = [
        {"labels": torch.tensor([1, 2, 3, 4]), "boxes": boxes},
        {"labels": torch.tensor([0]), "boxes": boxes[:1]},
    ]
    labels, noised, valid = dn.noised_targets(targets)
    assert labels.shape == valid.shape == (2, 12) and noised.shape == (2, 12, 4)
    assert valid[0].all() and valid[1].tolist() == [True, False, False, False] * 3
    assert (labels[~valid] == 5).all() and (labels[valid] < 5).all()
    original = boxes.repeat(3, 1)
    shift = (noised[0] - original).abs()
    assert (shift[:, :2] <= 0.2 * original[:, 2:] + 1e-6).all()  # centres: 0.4 half-sizes
    assert (shift[:, 2:] <= 0.4 * original[:, 2:] + 1e-6).all()  # sizes: 1 +- 0.4
    assert (shift > 0).all()
    flipped = (labels[0] != torch.tensor([1, 2, 3, 4]).repeat(3)).float().mean()
    assert 0.1 < flipped < 0.7  # ~0.5 * 4/5 of the labels change
    content, position, per_group = dn(targets)
    assert per_group == 4 and content.shape == position.shape == (2, 12, 16)
    assert (position[1, 1:4] == 0).all()


def test_denoising_losses_use_the_query_each_target_made():
    """No matching: query j of a copy is supervised by target j; padding slots add no box
    loss, and a copy that reconstructs its targets exactly has zero box losses."""
    criterion = SetCriterion(
        2,
        HungarianMatcher(),
        build_weight_dict({"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, 0),
        0.1,
    )
    targets = [
        {
            "labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    groups, per_group = 2, 2
    boxes = torch.full((groups * 2, per_group, 4), 0.1)
    for g in range(groups):
        boxes[g * 2, :2] = targets[0]["boxes"]
        boxes[g * 2 + 1, :1] = targets[1]["boxes"]
    logits = torch.zeros(groups * 2, per_group, 3)
    main = LossBranch("", {"pred_logits": logits[:2], "pred_boxes": boxes[:2]}, targets)

    def denoising(boxes):
        outputs = {"pred_logits": logits, "pred_boxes": boxes}
        return LossBranch(
            "_dn", outputs, targets, 1.0, groups, identity_matches=True, terms=("labels", "boxes")
        )

    with EventStorage(0):
        exact = criterion.branch_losses([main, denoising(boxes)])
        swapped = boxes.clone()
        swapped[[0, 2]] = boxes[[0, 2]].flip(1)  # query 0 <-> 1: matching would undo this
        moved = criterion.branch_losses([main, denoising(swapped)])
    assert exact["loss_bbox_dn"] == 0 and exact["loss_giou_dn"].abs() < 1e-6
    assert moved["loss_bbox_dn"] > 0.5
    assert exact["loss_ce_dn"] > 0


def test_denoising_alone_keeps_the_auxiliary_losses():
    cfg = tiny_cfg()
    cfg.MODEL.DETR.TRAINING_AIDS.DENOISING.GROUPS = 2
    model = build_model_no_weights(cfg).train()
    with EventStorage(0):
        losses = model(batch())
    last = len(model.transformer.decoder.layers) - 2
    assert {"loss_ce_0", f"loss_giou_{last}", "loss_bbox_dn", f"loss_giou_{last}_dn"} <= set(losses)


def test_each_group_is_matched_one_to_one_on_its_own():
    torch.manual_seed(0)
    n, groups, queries = 2, 3, 5
    logits, boxes = (
        torch.randn(groups * n, queries, 4),
        torch.rand(groups * n, queries, 4) * 0.5 + 0.25,
    )
    targets = [
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    matcher = HungarianMatcher()
    criterion = SetCriterion(
        3, matcher, build_weight_dict({"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}, 0), 0.1
    )
    _, _, (indices,) = criterion.compute(
        {"pred_logits": logits, "pred_boxes": boxes}, targets, num_groups=groups
    )
    assert len(indices) == groups * n
    for g in range(groups):
        for i, target in enumerate(targets):
            pred_idx, gt_idx = indices[g * n + i]
            alone = matcher(
                logits[g * n + i][None],
                boxes[g * n + i][None],
                [target["labels"]],
                [target["boxes"]],
            )[0]
            assert torch.equal(pred_idx, alone[0]) and torch.equal(gt_idx, alone[1])
            assert (
                len(pred_idx) == len(set(pred_idx.tolist())) == min(queries, len(target["labels"]))
            )


def test_group_losses_are_the_mean_over_groups():
    """G identical groups give the plain loss (each group normalised like plain DETR)."""
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 5, 4), torch.rand(2, 5, 4) * 0.5 + 0.25
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    for class_loss in ("softmax", "focal", "ia_bce"):
        criterion = SetCriterion(3, HungarianMatcher(), {}, 0.1, class_loss=class_loss)
        plain, _, _ = criterion.compute({"pred_logits": logits, "pred_boxes": boxes}, targets)
        tripled, _, _ = criterion.compute(
            {"pred_logits": logits.repeat(3, 1, 1), "pred_boxes": boxes.repeat(3, 1, 1)},
            targets,
            num_groups=3,
        )
        for key, value in plain.items():
            torch.testing.assert_close(tripled[key], value, rtol=1e-5, atol=1e-6)


def test_focal_and_ia_bce_class_losses_by_hand():
    """One image, two queries, one class: query 0 matched (target box = its own box, IoU 1)."""
    logits = torch.tensor([[[2.0, 0.0], [-1.0, 0.0]]])  # [1, 2, K+1], K = 1
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([0]), "boxes": boxes[0, :1].clone()}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    p = torch.sigmoid(torch.tensor([2.0, -1.0]))
    alpha, gamma = 0.25, 2.0
    focal = alpha * (1 - p[0]) ** gamma * -torch.log(p[0]) + (1 - alpha) * p[
        1
    ] ** gamma * -torch.log(1 - p[1])
    criterion = SetCriterion(1, HungarianMatcher(class_cost="focal"), {}, 0.1, class_loss="focal")
    loss = criterion.loss_labels(
        {"pred_logits": logits, "pred_boxes": boxes}, targets, indices, 1.0
    )["loss_ce"]
    torch.testing.assert_close(loss, focal, rtol=1e-5, atol=1e-6)
    t = p[0] ** alpha  # IoU 1
    ia_bce = (
        -t * torch.log(p[0]) - (1 - t) * torch.log(1 - p[0]) - p[1] ** gamma * torch.log(1 - p[1])
    )
    criterion.class_loss = "ia_bce"
    loss = criterion.loss_labels(
        {"pred_logits": logits, "pred_boxes": boxes}, targets, indices, 1.0
    )["loss_ce"]
    torch.testing.assert_close(loss, ia_bce, rtol=1e-5, atol=1e-6)


def test_focal_matching_cost_prefers_the_confident_query():
    logits = torch.tensor([[[3.0, 0.0], [-3.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])  # same box: class decides
    ((pred_idx, _),) = HungarianMatcher(class_cost="focal")(
        logits, boxes, [torch.tensor([0])], [boxes[0, :1]]
    )
    assert pred_idx.tolist() == [0]


def test_dense_head_assigns_centre_locations_to_the_smallest_box():
    head = DenseAuxHead(channels=8, num_classes=2)
    stride = 16.0
    xs = (torch.arange(4) + 0.5) * stride
    points = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(
        -1, 2
    )  # 4x4 grid, 64 px
    big = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    small = torch.tensor([[20.0, 20.0, 30.0, 30.0]])  # contains no location centre
    assigned = head._assign(points, torch.cat([big, small]), stride)
    assert assigned[5] == 1  # the location (24, 24) nearest the small box's centre is its own
    # the big box keeps the other locations within 1.5 strides (24 px) of its centre (32, 32)
    assert sorted(torch.nonzero(assigned == 0).flatten().tolist()) == [6, 9, 10]
    assert (assigned == -1).sum() == 12
    cls_logits, distances = head(torch.randn(1, 8, 4, 4))
    losses = head.losses(
        cls_logits,
        distances,
        torch.zeros(1, 4, 4, dtype=torch.bool),
        [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]])}],
        [(64, 64)],
        stride,
    )
    assert all(torch.isfinite(v) for v in losses.values())


def test_inference_model_is_plain_detr():
    """The training model has training-only parts; its inference model has exactly the modules
    and state-dict keys of the plain model's inference model."""
    cfg, plain_cfg = accelerated_cfg(), tiny_cfg("MODEL.DETR.LOSS.CLASS_LOSS", "ia_bce")
    model = build_model_no_weights(cfg)
    assert any(k.startswith("train_only.") for k in model.state_dict())
    fast = inference_model(model, cfg)
    plain_fast = inference_model(build_model_no_weights(plain_cfg), plain_cfg)
    assert set(fast.state_dict()) == set(plain_fast.state_dict())
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in plain_fast.named_modules()]


def test_switches_off_and_on_give_identical_inference_outputs(tmp_path):
    """A checkpoint of an accelerated model loads in the plain config (DetectionCheckpointer, as
    DefaultPredictor does) and predicts exactly what the accelerated model predicts."""
    accelerated = build_model_no_weights(accelerated_cfg()).eval()
    checkpointer = DetectionCheckpointer(accelerated, str(tmp_path))
    checkpointer.save("accelerated")
    plain = build_model_no_weights(
        tiny_cfg("MODEL.DETR.LOSS.CLASS_LOSS", "ia_bce", NUM_OBJECT_QUERIES=7)
    ).eval()
    DetectionCheckpointer(plain).load(str(tmp_path / "accelerated.pth"))
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batch()]
    with torch.no_grad():
        ours, theirs = accelerated(inputs), plain(inputs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a["instances"].scores, b["instances"].scores)
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


def test_training_queries_start_from_a_plain_checkpoint(tmp_path):
    plain = build_model_no_weights(tiny_cfg())
    DetectionCheckpointer(plain, str(tmp_path)).save("plain")
    torch.manual_seed(1)
    grouped = build_model_no_weights(tiny_cfg("MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS", 4))
    DetectionCheckpointer(grouped).load(str(tmp_path / "plain.pth"))
    extra = grouped.train_only["queries"].group_embed.weight.view(3, 7, -1)
    queries = plain.query_embed.weight
    for group in extra:
        difference = (group - queries).std() / queries.std()
        assert 0.05 < difference < 0.2  # the plain queries plus 10 % noise


@pytest.mark.parametrize("class_loss", ["softmax", "focal", "ia_bce"])
def test_bf16_training_with_all_aids_learns(class_loss):
    cfg = accelerated_cfg(class_loss)
    cfg.SOLVER.BASE_LR = 5e-4
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "bf16"
    model = build_model_no_weights(cfg).train()
    trainer = build_step_trainer(
        cfg, model, itertools.cycle([batch()]), build_detr_optimizer(cfg, model)
    )
    totals = []
    with EventStorage(0) as storage:
        for _ in range(10):
            trainer.run_step()
            totals.append(storage.history("total_loss").latest())
            keys = set(storage.histories())
            trainer.iter += 1
            storage.iter += 1
    assert {
        "loss_ce_o2m",
        "loss_dense_cls",
        "loss_dense_giou",
        "loss_ce_0",
        "loss_giou_0_dn",
    } <= keys
    assert all(torch.isfinite(torch.tensor(t)) for t in totals)
    assert totals[-1] < 0.8 * totals[0]


def test_weight_ema_by_hand():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = WeightEMA(model, decay=0.5)
    torch.nn.init.constant_(model.weight, 1.0)
    ema.update(model)  # decay min(0.5, 2/11) = 2/11
    assert ema.weights["weight"].item() == pytest.approx(9 / 11)
    ema.update(model)  # decay min(0.5, 3/12) = 0.25
    assert ema.weights["weight"].item() == pytest.approx(9 / 11 * 0.25 + 0.75)
    averaged = ema.averaged_model(model)
    assert averaged.weight.item() == pytest.approx(ema.weights["weight"].item())
    assert model.weight.item() == 1.0
    with pytest.raises(ValueError, match="SOLVER.EMA.DECAY"):
        WeightEMA(model, decay=1.0)


def test_invalid_switches_fail_with_the_key():
    with pytest.raises(ValueError, match="MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS"):
        build_model_no_weights(tiny_cfg("MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS", 0))
    bad = tiny_cfg()
    bad.MODEL.DETR.TRAINING_AIDS.DENOISING.GROUPS = -1
    with pytest.raises(ValueError, match="MODEL.DETR.TRAINING_AIDS.DENOISING.GROUPS"):
        build_model_no_weights(bad)
    with pytest.raises(ValueError, match="MODEL.DETR.LOSS.CLASS_LOSS"):
        build_model_no_weights(tiny_cfg("MODEL.DETR.LOSS.CLASS_LOSS", "sigmoid"))
    cfg = tiny_cfg("MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS", 2)
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    with pytest.raises(ValueError, match="MASK_ON"):
        build_model_no_weights(cfg)
