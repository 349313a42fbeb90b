"""The transformer trains batch-first with :func:`training_attention` on the official
``nn.MultiheadAttention`` weights and runs inference through those modules (attention capture
and export read them): both compute the same function, with the same gradients."""

import pytest
import torch
from detectron2.utils.events import EventStorage
from detr_tools.benchmark import synthetic_batch
from torch import nn

import detr_d2.modeling.transformer as transformer_module
from detr_d2.modeling.dropout import FastDropout
from detr_d2.modeling.transformer import Transformer, training_attention

from helpers import build_model_no_weights, tiny_cfg


def _attention_inputs():
    """Sequence-first query [7, 3, 64] and key [11, 3, 64], a padding and a set mask."""
    g = torch.Generator().manual_seed(0)
    query = torch.randn(7, 3, 64, generator=g)
    key = torch.randn(11, 3, 64, generator=g)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 8:] = True
    blocked = torch.zeros(7, 11, dtype=torch.bool)
    blocked[0, :3] = True
    return query, key, padding, blocked


MASKS = [
    {},
    {"key_padding_mask": "padding"},
    {"attn_mask": "blocked"},
    {"key_padding_mask": "padding", "attn_mask": "blocked"},
]


@pytest.mark.parametrize("masks", MASKS, ids=["none", "padding", "set", "both"])
@pytest.mark.parametrize("branch", ["fused", "explicit"])
def test_training_attention_equals_multihead_attention(masks, branch, monkeypatch):
    """Both branches (fused SDPA without attention dropout; explicit weights with it, here with
    a mask that keeps everything) against PyTorch's module on the same weights."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(64, 4, dropout=0.1).eval()
    query, key, padding, blocked = _attention_inputs()
    kwargs = {k: {"padding": padding, "blocked": blocked}[v] for k, v in masks.items()}
    expected = attn(query, key, key, need_weights=False, **kwargs)[0]
    if branch == "explicit":
        attn.train()
        monkeypatch.setattr(
            transformer_module,
            "keep_mask",
            lambda shape, p, device: (torch.ones(shape, dtype=torch.bool), 1.0),
        )
    tokens = (t.transpose(0, 1) for t in (query, key, key))
    got = training_attention(attn, *tokens, **kwargs).transpose(0, 1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_training_attention_dropout_is_unbiased_and_reaches_the_projections():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(64, 4, dropout=0.2)
    query, key, padding, _ = _attention_inputs()
    q, k = query.transpose(0, 1), key.transpose(0, 1)
    with torch.no_grad():
        expected = attn.eval()(query, key, key, key_padding_mask=padding, need_weights=False)[0]
        attn.train()
        draws = torch.stack(
            [training_attention(attn, q, k, k, key_padding_mask=padding) for _ in range(3000)]
        ).transpose(1, 2)
    assert not torch.allclose(draws[0], expected, atol=1e-3)  # dropout is applied
    # the mean of 3000 draws converges to the output without dropout
    assert (draws.mean(0) - expected).abs().max().item() < 0.1 * expected.abs().mean().item()
    attn.zero_grad()
    training_attention(attn, q, k, k).sum().backward()
    assert attn.in_proj_weight.grad.abs().sum() > 0 and attn.out_proj.weight.grad.abs().sum() > 0


def _transformer_inputs(n=2, queries=6, channels=32):
    g = torch.Generator().manual_seed(1)
    src = torch.randn(n, channels, 4, 5, generator=g)
    mask = torch.zeros(n, 4, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    pos = torch.randn(n, channels, 4, 5, generator=g)
    return src, mask, torch.randn(queries, channels, generator=g), pos


@pytest.mark.parametrize("case", ["plain", "pre_norm", "aids", "bf16_fp32_attention"])
def test_training_path_equals_the_inference_path_with_gradients(case):
    """Train mode (batch-first, dropout 0) against eval mode (the official sequence-first module
    calls) on the same weights: outputs and every parameter's gradient. ``aids``: a query-set
    mask and per-image decoder input, as the training aids use."""
    torch.manual_seed(0)
    model = Transformer(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
        dropout=0.0, normalize_before=case == "pre_norm", return_intermediate_dec=True,
        attention_fp32=case == "bf16_fp32_attention",
    )  # fmt: skip
    src, mask, queries, pos = _transformer_inputs()
    kwargs = {}
    if case == "aids":
        sets = torch.tensor([0, 0, 0, 1, 1, 2])
        kwargs = {
            "self_attn_mask": sets[:, None] != sets[None, :],
            "query_content": torch.randn(2, 6, 32),
        }
    results = []
    for train in (False, True):
        model.train(train).zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=case == "bf16_fp32_attention"):
            hs, memory = model(src, mask, queries, pos, **kwargs)
        (hs.float().square().mean() + memory.float().square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((hs.detach().float(), memory.detach().float(), grads))
    (hs_eval, mem_eval, grads_eval), (hs_train, mem_train, grads_train) = results
    tolerance = 3e-2 if case.startswith("bf16") else 1e-5
    torch.testing.assert_close(hs_train, hs_eval, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(mem_train, mem_eval, atol=tolerance, rtol=tolerance)
    for name, exact in grads_eval.items():
        scale = exact.abs().max().clamp(min=1e-8)
        bound = (0.05 if case.startswith("bf16") else 5e-5) * scale
        assert (grads_train[name] - exact).abs().max() <= bound, name


def test_inference_calls_the_attention_modules_and_training_does_not():
    """Attention capture (forward hooks on ``nn.MultiheadAttention``) sees every attention in
    eval mode; a training step goes through :func:`training_attention`, whose attention dropout
    draws the cheaper masks of ``dropout.py`` (one per attention)."""
    model = build_model_no_weights(tiny_cfg(DROPOUT=0.1))
    attentions = [m for m in model.transformer.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attentions) == 2 + 2 * 2
    calls = []
    for module in attentions:
        module.register_forward_hook(lambda *_: calls.append(1))
    kinds = {type(m) for m in model.transformer.modules() if isinstance(m, nn.Dropout)}
    assert kinds == {FastDropout}
    inputs = synthetic_batch(2, 96, 128, num_classes=3, seed=1, with_targets=True)
    with torch.no_grad():
        model.eval()([{k: v for k, v in x.items() if k != "instances"} for x in inputs])
    assert len(calls) == len(attentions)
    masks = []
    original = transformer_module.keep_mask

    def counting(*args):
        masks.append(args[0])
        return original(*args)

    transformer_module.keep_mask, calls[:] = counting, []
    try:
        model.train()
        with EventStorage(0):
            losses = model(inputs)
        sum(losses.values()).backward()
    finally:
        transformer_module.keep_mask = original
    assert not calls and len(masks) == len(attentions)
    assert all(torch.isfinite(v) for v in losses.values())
