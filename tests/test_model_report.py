"""detr_d2.model_report: parameters per part, trainable vs frozen, FLOPs, and a report that
survives a failing FLOP count."""

import logging

import pytest
import torch

from detr_d2 import model_report as report_module
from detr_d2.model_report import (
    count_flops,
    flops_image_size,
    log_model_report,
    model_report,
    parameter_counts,
)

from helpers import CONFIGS, build_model_no_weights, make_cfg, tiny_cfg


@pytest.fixture(scope="module")
def frozen_at_2():
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 2  # the official setting: stem and res2 frozen
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 160
    return cfg, build_model_no_weights(cfg)


def numel(parameters):
    return sum(p.numel() for p in parameters)


def test_parameter_counts_per_part(frozen_at_2):
    _, model = frozen_at_2
    counts = parameter_counts(model)
    parts = {
        "backbone": model.backbone,
        "input_proj": model.input_proj,
        "transformer encoder": model.transformer.encoder,
        "transformer decoder": model.transformer.decoder,
        "query embeddings": model.query_embed,
        "class head": model.class_embed,
        "box head": model.bbox_embed,
    }
    for label, module in parts.items():
        assert counts[label]["total"] == numel(module.parameters()), label
    assert counts["mask head"]["total"] == counts["other"]["total"] == 0
    assert counts["total"]["total"] == numel(model.parameters())
    assert counts["total"]["trainable"] + counts["total"]["frozen"] == counts["total"]["total"]
    frozen = numel(model.backbone.stem.parameters()) + numel(model.backbone.res2.parameters())
    assert frozen > 0 and counts["total"]["frozen"] == counts["backbone"]["frozen"] == frozen
    assert counts["total"]["trainable"] == numel(p for p in model.parameters() if p.requires_grad)


def test_flops_image_size():
    assert flops_image_size(make_cfg(CONFIGS / "detr_r50.yaml")) == (800, 1066)
    assert flops_image_size(make_cfg(CONFIGS / "detr_face_sample.yaml")) == (192, 256)


def test_flops_and_mode_restored(frozen_at_2):
    cfg, model = frozen_at_2
    model.train()
    total, parts, unsupported = count_flops(model, flops_image_size(cfg))
    assert model.training, "count_flops must restore training mode"
    assert total > 0 and sum(parts.values()) == total
    assert parts["backbone"] > parts["transformer encoder"] > 0
    assert parts["transformer decoder"] > 0 and parts["class head"] > 0
    # the encoder: its linear layers per token plus the fused attention (q k^T and weights v),
    # which fvcore does not know and the report counts itself; layer norms add a little
    encoder = model.transformer.encoder
    h, w = model.backbone(torch.zeros(1, 3, 96, 128))["res5"].shape[-2:]
    tokens = h * w
    linear = sum(
        m.in_features * m.out_features for m in encoder.modules() if isinstance(m, torch.nn.Linear)
    )
    in_proj = sum(layer.self_attn.in_proj_weight.numel() for layer in encoder.layers)
    attention = len(encoder.layers) * tokens * tokens * 2 * model.transformer.d_model
    expected = (linear + in_proj) * tokens + attention
    assert expected <= parts["transformer encoder"] <= 1.05 * expected
    assert "sigmoid" in unsupported  # listed, not counted


def test_report_text(frozen_at_2):
    cfg, model = frozen_at_2
    text = model_report(model, cfg)
    counts = parameter_counts(model)
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    for label in (
        "backbone",
        "input_proj",
        "transformer encoder",
        "transformer decoder",
        "query embeddings",
        "class head",
        "box head",
        "total",
    ):
        assert f"{counts[label]['total']:,}" in lines[label], label
    assert f"{counts['total']['frozen']:,}" in lines["total"]
    assert "mask head" not in lines
    assert "FLOPs for one 96x128 image" in text and "FLOPs: unavailable" not in text


def test_report_survives_failing_flops(frozen_at_2, monkeypatch, caplog):
    cfg, model = frozen_at_2

    def broken(*args, **kwargs):
        raise RuntimeError("tracer exploded\nsecond line")

    monkeypatch.setattr(report_module, "count_flops", broken)
    text = model_report(model, cfg)
    assert "FLOPs: unavailable (RuntimeError: tracer exploded)" in text
    assert f"{parameter_counts(model)['total']['total']:,}" in text
    with caplog.at_level(logging.INFO, logger="detr_d2.model_report"):
        log_model_report(model, cfg)
    assert "Model report: Detr" in caplog.text


def test_report_with_mask_head():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.DETR.CLASS_IS_THING = [True] * cfg.MODEL.DETR.NUM_CLASSES
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    model = build_model_no_weights(cfg)
    counts = parameter_counts(model)
    heads = [m for name, m in model.named_children() if name in ("bbox_attention", "mask_head")]
    assert counts["mask head"]["total"] == numel(p for m in heads for p in m.parameters()) > 0
    assert "mask head" in model_report(model, cfg, flops=False)
