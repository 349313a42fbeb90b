"""The training dropout's cheaper mask: rate, scale, independence, identity when off."""

import pytest
import torch
from torch import nn

from detr_d2.modeling.dropout import FastDropout, fast_dropout, keep_mask


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
