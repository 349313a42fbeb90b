"""DETR's training dropout, with the official semantics and a cheaper mask.

PyTorch's CPU dropout draws one Bernoulli sample per element (``aten::bernoulli_``: about 9 % of
an official R50 training step), and any attention dropout sends ``scaled_dot_product_attention``
to its unfused path where the same mask is drawn again. Here the keep mask comes from 64-bit
random words, four 15-bit lanes each, so one generator call covers four elements: each element is
kept independently with probability ``round((1 - p) * 2**15) / 2**15`` (within 1.6e-5 of
``1 - p``) and kept values are scaled by the inverse of that probability, so the expectation is
exact. The transformer's training attention (:func:`~.transformer.training_attention`) applies
the same mask to the softmax weights, as ``nn.MultiheadAttention`` does, through the module's own
projections (:func:`in_projections`): parameters and checkpoint keys are unchanged.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

_LANE_BITS = 15
_LANES = 1 << _LANE_BITS


def keep_mask(
    shape: torch.Size | tuple, p: float, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Bool mask of ``shape`` (True = keep) with keep probability ~``1 - p``, and the scale
    (inverse of the exact keep probability) that makes the masked values unbiased."""
    threshold = round((1.0 - p) * _LANES)
    if not 0 < threshold <= _LANES:
        raise ValueError(f"Dropout probability must be in [0, 1), got {p}.")
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()
    # random_() fills [0, 2**63 - 1]: every int16 lane has 15 uniform low bits (the top lane's
    # sign bit is always 0), so only those are compared
    lanes = words.view(torch.int16)[:count].bitwise_and_(_LANES - 1)
    return (lanes < threshold).view(shape), _LANES / threshold


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the cheaper mask of :func:`keep_mask`."""
    if not training or p == 0.0:
        return x
    mask, scale = keep_mask(x.shape, p, x.device)
    return x * mask * scale


class FastDropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask with :func:`keep_mask` (no parameters, same state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def in_projections(
    attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value projections of ``attn``'s packed ``in_proj`` (DETR's attention
    modules) on tokens of any layout [..., C]; self-attention (``query is key``) projects
    queries and keys in one matrix product."""
    channels = query.shape[-1]
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    w_q, w_k, w_v = weight.split(channels)
    b_q, b_k, b_v = bias.split(channels) if bias is not None else (None,) * 3
    if query is key:
        b_qk = bias[: 2 * channels] if bias is not None else None
        q, k = F.linear(query, weight[: 2 * channels], b_qk).chunk(2, -1)
    else:
        q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
    return q, k, F.linear(value, w_v, b_v)
