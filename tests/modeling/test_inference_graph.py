"""Inference copies (detr_d2.modeling.inference_graph) keep outputs correct: batch-norm folding and
channels-last within the fp32 parity tolerances of the official implementation, bf16 inference
within stated bf16 tolerances, compiled inference equal to eager."""

import copy
import logging

import pytest
import torch
from detr_tools.benchmark import synthetic_batch

from detr_d2.engine import build_checkpointer
from detr_d2.modeling.inference_graph import fold_batchnorm, inference_model

from helpers import (
    build_model_no_weights,
    cfg_for_manifest,
    load_reference,
    make_upstream_checkpoint,
    reference_inputs,
    tiny_cfg,
)


def reference_run(variant, directory, opts):
    """Official-checkpoint model of a fixture variant, built with config ``opts`` and made
    ready for inference the way the tools do (checkpointer, then ``inference_model``)."""
    expected, manifest = load_reference(variant)
    cfg = cfg_for_manifest(manifest["model"], masks=True)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = str(
        make_upstream_checkpoint(manifest, expected["args"]["seed"], directory / "up.pth")
    )
    model = build_model_no_weights(cfg)
    build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model = inference_model(model.eval(), cfg)
    return expected, model.predict_raw(reference_inputs(expected))


@pytest.mark.parametrize("variant", ["r50", "r50_dc5", "r50_panoptic"])
def test_folded_channels_last_fp32_keeps_parity(variant, tmp_path):
    opts = ["TEST.FOLD_BATCHNORM", "True", "MODEL.DETR.SPEED.MEMORY_FORMAT", "channels_last"]
    expected, raw = reference_run(variant, tmp_path, opts)
    reference = expected["outputs"]
    for key in ("pred_logits", "pred_boxes"):
        diff = (raw[key] - reference[key]).abs().max().item()
        assert diff <= 1e-4, f"{key}: {diff:.3g}"  # the fp32 parity tolerance
    for ours, theirs in zip(raw["aux_outputs"], reference["aux_outputs"]):
        assert (ours["pred_logits"] - theirs["pred_logits"]).abs().max() <= 1e-4
    if "pred_masks" in reference:  # the mask head reads channels-last backbone features
        masks = raw["pred_masks"][:, : reference["pred_masks"].shape[1]]
        assert (masks - reference["pred_masks"]).abs().max() <= 1e-3  # test_panoptic_parity's bound


@pytest.mark.parametrize("variant", ["r50", "r50_dc5"])
def test_bf16_inference_agrees_with_official_fp32(variant, tmp_path):
    """bf16 keeps ~3 significant digits: measured on these fixtures, logits move by <= 0.13,
    probabilities by <= 0.007, boxes by <= 0.019 (of the image size), top classes agree on
    99-100 % of the queries (the others are near-ties of random-weight logits)."""
    opts = [
        "TEST.PRECISION",
        "bf16",
        "TEST.FOLD_BATCHNORM",
        "True",
        "MODEL.DETR.SPEED.MEMORY_FORMAT",
        "channels_last",
    ]
    expected, raw = reference_run(variant, tmp_path, opts)
    reference = expected["outputs"]
    assert raw["pred_logits"].dtype == torch.float32  # post-processing always sees fp32
    top_agree = (
        (raw["pred_logits"].argmax(-1) == reference["pred_logits"].argmax(-1)).float().mean()
    )
    prob_diff = (raw["pred_logits"].softmax(-1) - reference["pred_logits"].softmax(-1)).abs()
    box_diff = (raw["pred_boxes"] - reference["pred_boxes"]).abs()
    logging.getLogger(__name__).info(
        f"{variant} bf16: top-class agreement {top_agree:.4f}, max prob diff {prob_diff.max():.3g}, "
        f"box diff max {box_diff.max():.3g} mean {box_diff.mean():.3g}"
    )
    assert top_agree >= 0.97
    assert prob_diff.max() <= 0.02
    assert box_diff.max() <= 0.04 and box_diff.mean() <= 0.005


def test_fold_batchnorm_with_batch_statistics_of_a_trained_model():
    """Real batch norms (the sample config trains them) fold exactly, in a copy only."""
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.TEST.FOLD_BATCHNORM = True
    model = build_model_no_weights(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # statistics and affine parameters as after training
        for tensor, low, high in (
            (norm.running_mean, -1, 1),
            (norm.running_var, 0.2, 3),
            (norm.weight.data, 0.5, 1.5),
            (norm.bias.data, -1, 1),
        ):
            tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))
    keys_before = set(model.state_dict())
    inputs = synthetic_batch(2, 96, 128, num_classes=3, seed=0, with_targets=False)
    expected = model.predict_raw(inputs)

    folded = inference_model(model, cfg)
    assert folded is not model and set(model.state_dict()) == keys_before
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    actual = folded.predict_raw(inputs)
    for key in ("pred_logits", "pred_boxes"):
        assert (actual[key] - expected[key]).abs().max() <= 1e-4

    with pytest.raises(RuntimeError, match="eval mode"):
        fold_batchnorm(copy.deepcopy(model).train())
    assert fold_batchnorm(copy.deepcopy(model)) == len(norms)


def test_compiled_inference_model_matches_eager():
    """``TEST.COMPILE`` (off by default: measured no gain on CPU, docs/benchmarks.md) compiles
    the inference copy only and keeps its outputs."""
    cfg = tiny_cfg()
    cfg.TEST.COMPILE = True
    model = build_model_no_weights(cfg).eval()
    inputs = synthetic_batch(1, 64, 96, num_classes=3, seed=2, with_targets=False)
    expected = model.predict_raw(inputs)
    compiled = inference_model(model, cfg)
    assert compiled is not model and not isinstance(
        model.backbone, torch._dynamo.eval_frame.OptimizedModule
    )
    actual = compiled.predict_raw(inputs)
    for key in ("pred_logits", "pred_boxes"):
        assert (actual[key] - expected[key]).abs().max() <= 1e-4
