"""Parity of DETR with masks (official DETRsegm + PostProcessPanoptic) on the reference fixture.

Built like a user: upstream-format file -> MODEL.WEIGHTS -> checkpointer, with the panoptic YAML.
Post-processing is checked in the checkpoint's own 251-logit layout (NUM_CLASSES 250, ids <= 90
are things): with untrained weights the unused logits carry real probability, so a remapped
133-class head would change the softmax; the 133-class remap is checked separately.
"""

import math

import pytest
import torch

from detr_d2.data import coco_class_rows
from detr_d2.engine import build_checkpointer

from helpers import (
    assert_close,
    build_model_no_weights,
    cfg_for_manifest,
    load_reference,
    make_upstream_checkpoint,
    reference_inputs,
    reference_targets,
)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    expected, manifest = load_reference("r50_panoptic")
    path = make_upstream_checkpoint(
        manifest, expected["args"]["seed"], tmp_path_factory.mktemp("ckpt") / "upstream.pth"
    )
    return expected, manifest, path


@pytest.fixture(scope="module")
def run(upstream):
    expected, manifest, path = upstream
    cfg = cfg_for_manifest(manifest["model"], masks=True)
    assert cfg.MODEL.MASK_ON and cfg.MODEL.DETR.NUM_CLASSES == 250
    cfg.MODEL.WEIGHTS = str(path)
    cfg.MODEL.DETR.TEST.PANOPTIC_THRESHOLD = expected["panoptic"]["threshold"]
    cfg.MODEL.DETR.TEST.INSTANCE_ON = True
    model = build_model_no_weights(cfg)
    build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model.eval()
    inputs = reference_inputs(expected)
    return {
        "expected": expected,
        "cfg": cfg,
        "model": model,
        "inputs": inputs,
        "raw": model.predict_raw(inputs),
    }


def test_every_official_key_is_loaded(run, upstream):
    """The mask head keeps the official names: nothing is missing or left over."""
    checkpointer = build_checkpointer(run["cfg"], run["model"])
    results = []
    load_model = checkpointer._load_model
    checkpointer._load_model = lambda checkpoint: (
        results.append(load_model(checkpoint)) or results[-1]
    )
    checkpointer.load(str(upstream[2]))
    incompatible = results[0]
    assert (
        not incompatible.missing_keys
        and not incompatible.unexpected_keys
        and not incompatible.incorrect_shapes
    )


def test_preprocessing_and_level_masks(run):
    model, expected = run["model"], run["expected"]
    images = model.preprocess_image(run["inputs"])
    assert math.isclose(
        images.tensor.double().sum().item(), expected["input_checksum"]["padded_sum"], rel_tol=1e-6
    )
    features = model.backbone(images.tensor)
    for level, name in enumerate(["res2", "res3", "res4", "res5"]):
        ref = expected["backbone_levels"][str(level)]
        assert list(features[name].shape) == ref["shape"], name
        assert torch.equal(model.padding_mask(images, features[name].shape[-2:]), ref["mask"]), name


def test_raw_outputs(run):
    raw, expected = run["raw"], run["expected"]["outputs"]
    assert_close(raw["pred_logits"], expected["pred_logits"], 1e-4, "pred_logits")
    assert_close(raw["pred_boxes"], expected["pred_boxes"], 1e-4, "pred_boxes")
    for i, (ours, theirs) in enumerate(
        zip(raw["aux_outputs"], expected["aux_outputs"], strict=True)
    ):
        assert_close(ours["pred_logits"], theirs["pred_logits"], 1e-4, f"aux {i} pred_logits")
        assert_close(ours["pred_boxes"], theirs["pred_boxes"], 1e-4, f"aux {i} pred_boxes")
    assert list(raw["pred_masks"].shape) == expected["pred_masks_full_shape"]
    assert_close(
        raw["pred_masks"][:, :10], expected["pred_masks"], 1e-3, "pred_masks (first 10 queries)"
    )


def test_losses_and_matching(run):
    """All losses, focal/dice on the final layer only, from our own outputs; matcher indices."""
    expected, criterion = run["expected"], run["model"].criterion
    losses, metrics, indices = criterion.compute(run["raw"], reference_targets(expected))
    reference = {k: v for k, v in expected["losses"].items() if k.startswith("loss_")}
    assert set(losses) == set(reference)
    for key, value in reference.items():
        assert abs(losses[key].item() - value) <= 1e-4, f"{key}: {losses[key].item()} vs {value}"
    assert metrics["class_error"] == pytest.approx(expected["losses"]["class_error"], abs=1e-4)
    for key in ("loss_mask", "loss_dice"):
        assert criterion.weight_dict[key] == expected["criterion"]["weight_dict"][key]
    for layer, ref in zip(
        indices, [expected["matcher_indices"]] + expected["aux_matcher_indices"], strict=True
    ):
        for (src, tgt), (ref_src, ref_tgt) in zip(layer, ref):
            assert torch.equal(src, ref_src) and torch.equal(tgt, ref_tgt)


def test_panoptic_postprocessing(run):
    """``forward`` in eval mode = official PostProcessPanoptic (ids shifted by 1: 0 is void)."""
    expected = run["expected"]["panoptic"]
    inputs = [
        dict(x, height=h, width=w) for x, (h, w) in zip(run["inputs"], expected["target_sizes_hw"])
    ]
    with torch.no_grad():
        outputs = run["model"](inputs)
    for i, output in enumerate(outputs):
        segment_ids, segments_info = output["panoptic_seg"]
        assert (
            segment_ids.dtype == torch.int32
            and list(segment_ids.shape) == expected["target_sizes_hw"][i]
        )
        equal = ((segment_ids - 1) == expected["id_maps"][i]).float().mean().item()
        assert equal >= 0.999, f"image {i}: only {equal:.4%} of the pixels have the reference id"
        assert len(segments_info) == len(expected["segments_info"][i])
        for ours, ref in zip(segments_info, expected["segments_info"][i]):
            assert ours["id"] - 1 == ref["id"]
            assert (ours["category_id"], ours["isthing"]) == (ref["category_id"], ref["isthing"])
            assert abs(ours["area"] - ref["area"]) <= 10, (ours, ref)
        # the queries that pass the threshold (before small segments are dropped)
        probs = run["raw"]["pred_logits"][i].softmax(-1)
        scores, labels = probs.max(-1)
        kept = ((labels != probs.shape[-1] - 1) & (scores > expected["threshold"])).nonzero()[:, 0]
        assert torch.equal(kept, expected["kept_queries"][i])
        assert sorted(s["score"] for s in segments_info) == pytest.approx(
            sorted(scores[kept].tolist())
        )


def test_instances_have_full_resolution_masks(run):
    image = run["inputs"][1]["image"]
    height, width = 2 * image.shape[1], 2 * image.shape[2]
    with torch.no_grad():
        output = run["model"]([dict(run["inputs"][1], height=height, width=width)])[0]
    instances = output["instances"]
    assert instances.pred_masks.dtype == torch.bool and tuple(instances.pred_masks.shape[1:]) == (
        height,
        width,
    )
    assert instances.image_size == (height, width) and len(instances) > 0
    assert set(instances.pred_classes.tolist()) <= set(range(91))  # things only (ids <= 90)
    assert output["panoptic_seg"][0].shape == (height, width)


def test_133_class_remap(upstream):
    """NUM_CLASSES 133 (Detectron2's COCO panoptic classes): the official head's rows are those
    of the dataset's COCO panoptic category ids, plus "no object"."""
    expected, manifest, path = upstream
    cfg = cfg_for_manifest(manifest["model"], masks=True)
    cfg.MODEL.DETR.NUM_CLASSES = 133
    cfg.MODEL.WEIGHTS = str(path)
    rows = coco_class_rows(cfg)
    assert (
        len(rows) == 133
        and rows[:3] == [1, 2, 3]
        and rows[79] == 90
        and rows[80] == 92
        and rows[-1] == 200
    )
    model = build_model_no_weights(cfg)
    build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    state = torch.load(path, weights_only=True)["model"]
    index = torch.as_tensor(rows + [250])
    assert torch.equal(model.class_embed.weight, state["detr.class_embed.weight"][index])
    assert torch.equal(model.class_embed.bias, state["detr.class_embed.bias"][index])
    assert model.postprocess.thing_ids == tuple(range(80))
