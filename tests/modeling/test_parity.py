"""Parity with the official DETR implementation on the reference fixtures.

The model is built from the YAML configs and loaded from an upstream-format file through
MODEL.WEIGHTS and the checkpointer, the same path a user takes.
"""

import math

import pytest
import torch
from detectron2.utils.events import EventStorage

from detr_d2.engine import build_checkpointer

from helpers import (
    assert_close,
    build_model_no_weights,
    cfg_for_manifest,
    load_reference,
    make_upstream_checkpoint,
    reference_inputs,
)

VARIANTS = ["r50", "r50_dc5"]


@pytest.fixture(scope="module", params=VARIANTS)
def run(request, tmp_path_factory):
    expected, manifest = load_reference(request.param)
    path = make_upstream_checkpoint(
        manifest, expected["args"]["seed"], tmp_path_factory.mktemp("ckpt") / "upstream.pth"
    )
    cfg = cfg_for_manifest(manifest["model"])
    cfg.MODEL.WEIGHTS = str(path)
    model = build_model_no_weights(cfg)
    build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model.eval()
    inputs = reference_inputs(expected)
    return {
        "expected": expected,
        "model": model,
        "inputs": inputs,
        "raw": model.predict_raw(inputs),
    }


def test_input_checksum(run):
    """Normalization and padding as the official batching (debugs preprocessing first)."""
    model, checksum = run["model"], run["expected"]["input_checksum"]
    images = model.preprocess_image(run["inputs"])
    batch = images.tensor.double()
    assert list(batch.shape[-2:]) == run["expected"]["padded_size_hw"]
    assert math.isclose(batch.sum().item(), checksum["padded_sum"], rel_tol=1e-6)
    assert math.isclose(batch.abs().sum().item(), checksum["padded_abs_sum"], rel_tol=1e-6)
    mask = model.padding_mask(images, tuple(batch.shape[-2:]))
    assert mask.sum().item() == checksum["pad_mask_true_count"]


def test_feature_mask(run):
    model, attention = run["model"], run["expected"]["attention"]
    images = model.preprocess_image(run["inputs"])
    feature = model.backbone(images.tensor)[model.in_feature]
    assert list(feature.shape) == attention["feature_shape"]
    assert torch.equal(model.padding_mask(images, feature.shape[-2:]), attention["feature_mask"])


def test_raw_outputs(run):
    raw, expected = run["raw"], run["expected"]["outputs"]
    assert_close(raw["pred_logits"], expected["pred_logits"], 1e-4, "pred_logits")
    assert_close(raw["pred_boxes"], expected["pred_boxes"], 1e-4, "pred_boxes")
    assert len(raw["aux_outputs"]) == len(expected["aux_outputs"])
    for i, (ours, theirs) in enumerate(zip(raw["aux_outputs"], expected["aux_outputs"])):
        assert_close(ours["pred_logits"], theirs["pred_logits"], 1e-4, f"aux {i} pred_logits")
        assert_close(ours["pred_boxes"], theirs["pred_boxes"], 1e-4, f"aux {i} pred_boxes")


def test_losses_and_matching(run):
    expected = run["expected"]
    criterion = run["model"].criterion
    losses, metrics, indices = criterion.compute(expected["outputs"], expected["targets"])
    for key, value in expected["losses"].items():
        if key.startswith("loss_"):
            assert abs(losses[key].item() - value) <= 1e-4, (
                f"{key}: {losses[key].item()} vs {value}"
            )
    assert metrics["class_error"] == pytest.approx(expected["losses"]["class_error"], abs=1e-4)
    assert metrics["cardinality_error"] == pytest.approx(
        expected["losses"]["cardinality_error"], abs=1e-4
    )
    assert set(losses) == {k for k in expected["losses"] if k.startswith("loss_")}
    for layer, ref in zip(indices, [expected["matcher_indices"]] + expected["aux_matcher_indices"]):
        for (src, tgt), (ref_src, ref_tgt) in zip(layer, ref):
            assert torch.equal(src, ref_src) and torch.equal(tgt, ref_tgt)
    # the weighted dict Detectron2 sums: the official weights, in the event storage context
    with EventStorage():
        weighted = criterion(expected["outputs"], expected["targets"])
    for key, value in expected["losses"].items():
        if key.startswith("loss_"):
            weight = expected["criterion"]["weight_dict"][key]
            assert abs(weighted[key].item() - weight * value) <= 1e-4 * weight


def test_losses_from_model_outputs(run):
    """The loss on our own outputs equals the reference (forward + criterion together)."""
    expected = run["expected"]
    losses, _, _ = run["model"].criterion.compute(run["raw"], expected["targets"])
    for key, value in expected["losses"].items():
        if key.startswith("loss_"):
            assert abs(losses[key].item() - value) <= 1e-4, key


def test_postprocess(run):
    """``forward`` in eval mode = the official PostProcess at the requested output size."""
    expected = run["expected"]["postprocess"]
    inputs = [
        dict(x, height=h, width=w) for x, (h, w) in zip(run["inputs"], expected["target_sizes_hw"])
    ]
    with torch.no_grad():
        outputs = run["model"](inputs)
    for output, ref in zip(outputs, expected["results"]):
        instances = output["instances"]
        assert len(instances) == len(ref["labels"])
        assert torch.equal(instances.pred_classes, ref["labels"])
        assert_close(instances.scores, ref["scores"], 1e-5, "scores")
        assert_close(instances.pred_boxes.tensor, ref["boxes"], 1e-2, "boxes (pixels)")
