"""Cheaper dropout for CPU training (``MODEL.DETR.FAST_DROPOUT``), with the official semantics.

PyTorch's CPU dropout draws one Bernoulli sample per element (``aten::bernoulli_``: about 9 % of
an official R50 training step), and any attention dropout sends ``scaled_dot_product_attention``
to its unfused path where the same mask is drawn again. Here the keep mask comes from 64-bit
random words, four 15-bit lanes each, so one generator call covers four elements: each element is
kept independently with probability ``round((1 - p) * 2**15) / 2**15`` (within 1.6e-5 of
``1 - p``) and kept values are scaled by the inverse of that probability, so the expectation is
exact. The attention variant applies the mask to the softmax weights, as ``nn.MultiheadAttention``
does, and reuses the module's own projections: parameters and checkpoint keys are unchanged.
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


def attention_with_fast_dropout(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    batch_first: bool = False,
) -> torch.Tensor:
    """``attn(query, key, value, need_weights=False, ...)[0]`` of a sequence-first
    ``nn.MultiheadAttention`` with packed input projections (DETR's), attention-weight dropout
    drawn with :func:`keep_mask`. Tokens are [T, N, C], or [N, T, C] with ``batch_first`` (the
    layout of ``MODEL.DETR.BATCH_FIRST_TRAINING``; the same mask is drawn in both layouts).
    Masks are bool (True = blocked): ``key_padding_mask`` [N, S], ``attn_mask`` [L, S]."""
    batch = query.shape[0 if batch_first else 1]
    length, channels = query.shape[1 if batch_first else 0], query.shape[2]
    heads = attn.num_heads
    head_dim = channels // heads

    def split_heads(x):  # -> [N, heads, T, head_dim], a view
        if batch_first:
            return x.view(batch, x.shape[1], heads, head_dim).transpose(1, 2)
        return x.view(x.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = (split_heads(x) for x in in_projections(attn, query, key, value))
    scores = torch.matmul(q * head_dim**-0.5, k.transpose(-1, -2))  # [N, heads, L, S]
    blocked = None
    if key_padding_mask is not None:
        blocked = key_padding_mask.view(batch, 1, 1, -1)
    if attn_mask is not None:
        blocked = attn_mask if blocked is None else blocked | attn_mask
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    weights = scores.softmax(dim=-1)
    if attn.training and attn.dropout > 0.0:
        mask, scale = keep_mask(weights.shape, attn.dropout, weights.device)
        out = torch.matmul(weights * mask, v) * scale  # the scale on the small output
    else:
        out = torch.matmul(weights, v)
    if batch_first:
        out = out.transpose(1, 2).reshape(batch, length, channels)
    else:
        out = out.permute(2, 0, 1, 3).reshape(length, batch, channels)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
