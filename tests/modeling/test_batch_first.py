"""MODEL.DETR.BATCH_FIRST_TRAINING: the batch-first training transformer computes what the
official sequence-first one computes, with the same parameters; inference is untouched."""

import pytest
import torch
from detectron2.utils.events import EventStorage

from detr_d2.dev.benchmark import synthetic_batch

from helpers import build_model_no_weights, tiny_cfg


def batch():
    return synthetic_batch(2, 96, 128, num_classes=3, seed=1, with_targets=True)


def losses_and_grads(cfg, inputs):
    model = build_model_no_weights(cfg).train()
    torch.manual_seed(5)  # the denoising queries' noise
    with EventStorage(0), torch.autocast("cpu", torch.bfloat16, enabled=cfg.SOLVER.AMP.ENABLED):
        losses = model(inputs)
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize(
    "aids",
    [
        {},
        {"PRE_NORM": True},
        {"GROUPS": 3, "CLASS_LOSS": "ia_bce", "denoising": 2, "one_to_many": 6, "dense": True},
        {"GROUPS": 2, "bf16": True},
    ],
    ids=["plain", "pre_norm", "all_aids", "bf16_fp32_attention"],
)
def test_training_losses_and_gradients_match_the_sequence_first_path(aids):
    aids = dict(aids)
    extra = {k: aids.pop(k) for k in ("denoising", "one_to_many", "dense", "bf16") if k in aids}
    cfgs = []
    for batch_first in (False, True):
        cfg = tiny_cfg(BATCH_FIRST_TRAINING=batch_first, **aids)
        cfg.MODEL.DETR.DENOISING.GROUPS = extra.get("denoising", 0)
        cfg.MODEL.DETR.ONE_TO_MANY.NUM_QUERIES = extra.get("one_to_many", 0)
        cfg.MODEL.DETR.DENSE_AUX.ENABLED = extra.get("dense", False)
        cfg.SOLVER.AMP.ENABLED = extra.get("bf16", False)
        cfg.MODEL.DETR.ATTENTION_FP32 = extra.get("bf16", False)
        cfgs.append(cfg)
    inputs = batch()
    (seq_losses, seq_grads), (bf_losses, bf_grads) = (losses_and_grads(c, inputs) for c in cfgs)
    assert seq_losses.keys() == bf_losses.keys() and len(seq_losses) >= 6
    tolerance = 2e-2 if extra.get("bf16") else 1e-5
    for key in seq_losses:
        torch.testing.assert_close(bf_losses[key], seq_losses[key], rtol=tolerance, atol=tolerance)
    assert seq_grads.keys() == bf_grads.keys()
    for name in seq_grads:
        scale = seq_grads[name].abs().max().clamp(min=1e-8)
        assert (bf_grads[name] - seq_grads[name]).abs().max() <= tolerance * 5 * scale, name


def test_inference_and_attention_dropout_in_training():
    """Eval runs the sequence-first path (identical outputs); with attention dropout the
    batch-first training step runs and its dropout is active."""
    plain = build_model_no_weights(tiny_cfg(DROPOUT=0.1)).eval()
    fast = build_model_no_weights(tiny_cfg(DROPOUT=0.1, BATCH_FIRST_TRAINING=True)).eval()
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batch()]
    with torch.no_grad():
        for a, b in zip(plain(inputs), fast(inputs)):
            assert torch.equal(a["instances"].scores, b["instances"].scores)
    fast.train()
    with EventStorage(0), torch.no_grad():
        torch.manual_seed(1)
        first = fast(batch())
        torch.manual_seed(2)
        second = fast(batch())
    assert first["loss_giou"] != second["loss_giou"]
