"""MODEL.DETR.BATCH_FIRST_TRAINING: the batch-first training transformer computes what the
official sequence-first one computes, with the same parameters; inference is untouched."""

import pytest
import torch
from detectron2.utils.events import EventStorage
from detr_tools.benchmark import synthetic_batch

from detr_d2.modeling.transformer import batch_first_attention

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
    if not extra.get("bf16"):
        for name in seq_grads:
            scale = seq_grads[name].abs().max().clamp(min=1e-8)
            assert (bf_grads[name] - seq_grads[name]).abs().max() <= 5e-5 * scale, name
        return
    # bf16 rounds each layout differently, and some gradients (query_embed's) move by half their
    # norm between fp32 and bf16 on some CPUs: both layouts must be as close to fp32 as each other.
    cfg_fp32 = cfgs[0].clone()
    cfg_fp32.SOLVER.AMP.ENABLED = False
    _, fp32_grads = losses_and_grads(cfg_fp32, inputs)
    for name, exact in fp32_grads.items():
        seq_error, bf_error = ((g[name] - exact).norm() for g in (seq_grads, bf_grads))
        assert bf_error <= 2 * seq_error + 0.02 * exact.norm(), name


def test_batch_first_attention_equals_multihead_attention():
    """Against PyTorch's own module: self- and cross-attention with padding and set masks, and
    the module's attention-weight dropout in training."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 4, dropout=0.5).eval()
    x, memory = torch.randn(6, 3, 16), torch.randn(9, 3, 16)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    sets = torch.tensor([0, 0, 1, 1, 1, 2])
    blocked = sets[:, None] != sets[None, :]
    cases = [
        ((x, x, x), {"attn_mask": blocked}),
        ((x, memory, memory), {"key_padding_mask": padding}),
    ]
    for (q, k, v), masks in cases:
        expected = attn(q, k, v, need_weights=False, **masks)[0]  # [L, N, C]
        got = batch_first_attention(attn, *(t.transpose(0, 1) for t in (q, k, v)), **masks)
        torch.testing.assert_close(got.transpose(0, 1), expected, atol=1e-5, rtol=1e-5)
    attn.train()
    q, k, v = (t.transpose(0, 1) for t in (x, memory, memory))
    draws = [batch_first_attention(attn, q, k, v, key_padding_mask=padding) for _ in range(2)]
    assert not torch.allclose(draws[0], draws[1])  # dropout is drawn in training
    assert not torch.allclose(draws[0], expected.transpose(0, 1))


def test_inference_runs_the_sequence_first_path():
    """Eval outputs are identical with and without the switch."""
    plain = build_model_no_weights(tiny_cfg(DROPOUT=0.1)).eval()
    fast = build_model_no_weights(tiny_cfg(DROPOUT=0.1, BATCH_FIRST_TRAINING=True)).eval()
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in batch()]
    with torch.no_grad():
        for a, b in zip(plain(inputs), fast(inputs)):
            assert torch.equal(a["instances"].scores, b["instances"].scores)
            assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


def test_fast_dropout_keeps_its_attention_masks_batch_first(monkeypatch):
    """With FAST_DROPOUT the batch-first training attention draws FAST_DROPOUT's masks (not
    SDPA's Bernoulli ones), as the sequence-first path does."""
    import detr_d2.modeling.transformer as transformer

    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("batch_first"))
        return fast_attention(*args, **kwargs)

    fast_attention = transformer.attention_with_fast_dropout
    monkeypatch.setattr(transformer, "attention_with_fast_dropout", counting)
    monkeypatch.setattr(transformer, "batch_first_attention", None)  # must not be called
    cfg = tiny_cfg(DROPOUT=0.1, FAST_DROPOUT=True, BATCH_FIRST_TRAINING=True)
    losses, grads = losses_and_grads(cfg, batch())
    assert calls and all(calls)  # every attention of the step, batch-first
    assert all(torch.isfinite(v) for v in losses.values()) and grads
