import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from detr_d2.modeling.dropout import (
    FastDropout,
    attention_with_fast_dropout,
    fast_dropout,
    keep_mask,
)
from detr_d2.modeling.transformer import Transformer

from helpers import build_model_no_weights, tiny_cfg


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_rate_and_scale(p):
    torch.manual_seed(0)
    mask, scale = keep_mask((2000, 1000), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (2000, 1000)
    exact_keep = 1.0 / scale
    assert abs(exact_keep - (1 - p)) < 1.6e-5
    # 2M Bernoulli draws: the standard error of the rate is < 4e-4
    assert abs(mask.float().mean().item() - exact_keep) < 2e-3
    # the four lanes of one random word are independent: every lane keeps at the same rate, and
    # neighbouring elements agree as often as independent draws do
    lanes = mask.flatten()[: 2000 * 1000 // 4 * 4].view(-1, 4).float()
    for lane in lanes.unbind(1):
        assert abs(lane.mean().item() - exact_keep) < 4e-3
    both = (lanes[:, 0] * lanes[:, 1]).mean().item()
    assert abs(both - exact_keep**2) < 4e-3


def test_keep_mask_rejects_probability_one():
    with pytest.raises(ValueError, match="Dropout probability"):
        keep_mask((4,), 1.0, torch.device("cpu"))


def test_fast_dropout_is_unbiased_and_identity_when_off():
    x = torch.randn(500, 400)
    assert fast_dropout(x, 0.1, training=False) is x
    assert fast_dropout(x, 0.0, training=True) is x
    torch.manual_seed(1)
    out = fast_dropout(torch.ones(1000, 1000), 0.25, training=True)
    values = out.unique()
    assert len(values) == 2 and values[0] == 0
    assert abs(out.mean().item() - 1.0) < 3e-3
    module = FastDropout(0.3).eval()
    assert torch.equal(module(x), x)
    assert module.state_dict() == nn.Dropout(0.3).state_dict()


def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(7, 3, 64, generator=g)
    key = torch.randn(11, 3, 64, generator=g)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 8:] = True
    blocked = torch.zeros(7, 11, dtype=torch.bool)
    blocked[0, :3] = True
    return query, key, padding, blocked


def test_attention_matches_multihead_attention_without_dropout():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(64, 4, dropout=0.1).eval()
    query, key, padding, blocked = _attention_inputs()
    for kwargs in (
        {},
        {"key_padding_mask": padding},
        {"attn_mask": blocked},
        {"key_padding_mask": padding, "attn_mask": blocked},
    ):
        expected = attn(query, key, key, need_weights=False, **kwargs)[0]
        got = attention_with_fast_dropout(attn, query, key, key, **kwargs)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        batch_first = attention_with_fast_dropout(
            attn, query.transpose(0, 1), key.transpose(0, 1), key.transpose(0, 1),
            batch_first=True, **kwargs,
        )  # fmt: skip
        torch.testing.assert_close(batch_first.transpose(0, 1), expected, atol=1e-6, rtol=1e-5)


def test_attention_dropout_draws_the_same_mask_in_both_layouts():
    """MODEL.DETR.BATCH_FIRST_TRAINING with FAST_DROPOUT: the batch-first attention drops the
    same attention weights as the sequence-first one for the same generator state."""
    attn = nn.MultiheadAttention(64, 4, dropout=0.3).train()
    query, key, padding, blocked = _attention_inputs()
    masks = {"key_padding_mask": padding, "attn_mask": blocked}
    torch.manual_seed(3)
    expected = attention_with_fast_dropout(attn, query, key, key, **masks)
    torch.manual_seed(3)
    tokens = (t.transpose(0, 1) for t in (query, key, key))
    got = attention_with_fast_dropout(attn, *tokens, batch_first=True, **masks)
    torch.testing.assert_close(got.transpose(0, 1), expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(expected, attn.eval()(query, key, key, **masks)[0], atol=1e-3)


def test_attention_dropout_is_unbiased_and_masks_weights():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(64, 4, dropout=0.2)
    query, key, padding, _ = _attention_inputs()
    with torch.no_grad():
        expected = attn.eval()(query, key, key, key_padding_mask=padding, need_weights=False)[0]
        attn.train()
        draws = torch.stack(
            [
                attention_with_fast_dropout(attn, query, key, key, key_padding_mask=padding)
                for _ in range(3000)
            ]
        )
    assert not torch.allclose(draws[0], expected, atol=1e-3)  # dropout is applied
    # the mean of 3000 draws converges to the output without dropout
    assert (draws.mean(0) - expected).abs().max().item() < 0.1 * expected.abs().mean().item()
    # gradients reach the projections
    attn.zero_grad()
    attention_with_fast_dropout(attn, query, key, key).sum().backward()
    assert attn.in_proj_weight.grad.abs().sum() > 0 and attn.out_proj.weight.grad.abs().sum() > 0


def test_transformer_with_fast_dropout_has_the_same_keys_and_eval_outputs():
    torch.manual_seed(0)
    sizes = dict(
        d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64
    )
    plain = Transformer(**sizes, dropout=0.1, return_intermediate_dec=True)
    fast = Transformer(**sizes, dropout=0.1, return_intermediate_dec=True, fast_dropout=True)
    assert plain.state_dict().keys() == fast.state_dict().keys()
    fast.load_state_dict(plain.state_dict())
    src = torch.randn(2, 32, 4, 5)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    queries = torch.randn(6, 32)
    pos = torch.randn(2, 32, 4, 5)
    plain.eval(), fast.eval()
    with torch.no_grad():
        for a, b in zip(plain(src, mask, queries, pos), fast(src, mask, queries, pos)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    fast.train()
    hs, _ = fast(src, mask, queries, pos)
    hs.sum().backward()
    assert all(p.grad is not None for p in fast.parameters())
    kinds = {type(m) for m in fast.modules() if isinstance(m, nn.Dropout)}
    assert kinds == {FastDropout}


@pytest.mark.parametrize("fast", [False, True])
def test_config_key_switches_the_dropout_and_keeps_the_checkpoint_keys(fast):
    torch.manual_seed(0)
    model = build_model_no_weights(tiny_cfg(DROPOUT=0.1, FAST_DROPOUT=fast))
    kinds = {type(m) for m in model.transformer.modules() if isinstance(m, nn.Dropout)}
    assert kinds == ({FastDropout} if fast else {nn.Dropout})
    torch.manual_seed(0)
    plain = build_model_no_weights(tiny_cfg(DROPOUT=0.1))
    assert model.state_dict().keys() == plain.state_dict().keys()
    model.train()
    with EventStorage(0):
        losses = model(_training_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def _training_batch():
    instances = Instances((64, 96))
    instances.gt_boxes = Boxes(torch.tensor([[8.0, 6.0, 40.0, 50.0]]))
    instances.gt_classes = torch.tensor([0])
    return [
        {"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8), "instances": instances}
    ]
