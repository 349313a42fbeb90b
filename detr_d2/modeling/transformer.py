"""The DETR encoder-decoder transformer (paper Sec. 3.2, Fig. 10).

Inference runs the official sequence-first layout, as ``nn.MultiheadAttention`` expects by
default (S = H*W memory tokens, feature map flattened row-major, padded positions included;
Q = object queries; N = batch; C = hidden dim): attention capture hooks and export read those
module calls. Training runs batch-first ([N, S, C]) on the same ``nn.MultiheadAttention``
weights with :func:`training_attention`: the CPU flash kernel's output is laid out
[N, S, heads, head_dim], so batch-first needs no copy to put it back where the sequence-first
path copies around every attention, and dropout masks come from :mod:`.dropout`. Same
parameters, same results up to float rounding (tested). Module and parameter names follow the
official implementation, so official checkpoints load without renaming the transformer.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import attention_in_fp32
from .dropout import FastDropout, in_projections, keep_mask


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _attention(
    layer: nn.Module, attn: nn.MultiheadAttention, query, key, value, batch_first=False, **kwargs
):
    """``attn(query, key, value, need_weights=False, **kwargs)[0]``, batch-first in training
    (:func:`training_attention`); with ``layer.attention_fp32`` inside an autocast region,
    computed in fp32 (``MODEL.DETR.SPEED.ATTENTION_PRECISION``)."""
    if layer.attention_fp32 and torch.is_autocast_enabled(query.device.type):
        with torch.autocast(query.device.type, enabled=False):
            query, key, value = query.float(), key.float(), value.float()
            return _attention(layer, attn, query, key, value, batch_first, **kwargs)
    if batch_first:
        return training_attention(attn, query, key, value, **kwargs)
    return attn(query, key, value, need_weights=False, **kwargs)[0]


def training_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``attn`` (sequence-first, packed input projections: DETR's) computes, on batch-first
    tokens: query [N, L, C], key/value [N, S, C] -> [N, L, C]. Masks are bool, True = blocked:
    ``key_padding_mask`` [N, S], ``attn_mask`` [L, S]. Without attention dropout (eval mode or
    p = 0) it is one fused ``F.scaled_dot_product_attention``; with it, explicit softmax weights
    dropped with :func:`~.dropout.keep_mask` (PyTorch's own dropout would send SDPA to its
    unfused path and draw one Bernoulli sample per weight)."""
    n, length, channels = query.shape
    heads = attn.num_heads
    q, k, v = in_projections(attn, query, key, value)

    def split_heads(x):  # [N, T, C] -> [N, heads, T, C / heads], a view
        return x.view(n, x.shape[1], heads, channels // heads).transpose(1, 2)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    blocked = None
    if key_padding_mask is not None:
        blocked = key_padding_mask.view(n, 1, 1, -1)
    if attn_mask is not None:
        blocked = attn_mask if blocked is None else blocked | attn_mask
    if attn.training and attn.dropout > 0.0:
        scores = torch.matmul(q * (channels // heads) ** -0.5, k.transpose(-1, -2))
        if blocked is not None:
            scores = scores.masked_fill(blocked, float("-inf"))
        weights = scores.softmax(dim=-1)  # [N, heads, L, S]
        mask, scale = keep_mask(weights.shape, attn.dropout, weights.device)
        out = torch.matmul(weights * mask, v) * scale  # the scale on the small output
    else:  # SDPA's bool masks are True where attention is allowed
        allowed = None if blocked is None else ~blocked
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out = out.transpose(1, 2).reshape(n, length, channels)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN; position added to queries and keys only (not to values)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        normalize_before: bool,
        attention_fp32: bool = False,
    ):
        super().__init__()
        self.attention_fp32 = attention_fp32
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = FastDropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = FastDropout(dropout)
        self.dropout2 = FastDropout(dropout)
        self.normalize_before = normalize_before

    def _attend(self, x, pos, key_padding_mask, batch_first):
        q = k = _with_pos(x, pos)
        return _attention(
            self, self.self_attn, q, k, x, batch_first, key_padding_mask=key_padding_mask
        )

    def _ffn(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(
        self,
        src: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        pos: torch.Tensor | None,
        batch_first: bool = False,
    ) -> torch.Tensor:
        """src, pos: [S, N, C] ([N, S, C] with ``batch_first``); key_padding_mask: bool [N, S],
        True on padding."""
        if self.normalize_before:
            src = src + self.dropout1(
                self._attend(self.norm1(src), pos, key_padding_mask, batch_first)
            )
            return src + self.dropout2(self._ffn(self.norm2(src)))
        src = self.norm1(src + self.dropout1(self._attend(src, pos, key_padding_mask, batch_first)))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the memory, FFN."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        normalize_before: bool,
        attention_fp32: bool = False,
    ):
        super().__init__()
        self.attention_fp32 = attention_fp32
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = FastDropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = FastDropout(dropout)
        self.dropout2 = FastDropout(dropout)
        self.dropout3 = FastDropout(dropout)
        self.normalize_before = normalize_before

    def _self_attend(self, x, query_pos, attn_mask, batch_first):
        q = k = _with_pos(x, query_pos)
        return _attention(self, self.self_attn, q, k, x, batch_first, attn_mask=attn_mask)

    def _cross_attend(self, x, memory, memory_key_padding_mask, pos, query_pos, batch_first):
        return _attention(
            self,
            self.multihead_attn,
            _with_pos(x, query_pos),
            _with_pos(memory, pos),
            memory,
            batch_first,
            key_padding_mask=memory_key_padding_mask,
        )

    def _ffn(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_key_padding_mask: torch.Tensor | None,
        pos: torch.Tensor | None,
        query_pos: torch.Tensor | None,
        self_attn_mask: torch.Tensor | None = None,
        batch_first: bool = False,
    ) -> torch.Tensor:
        """tgt, query_pos: [Q, N, C]; memory, pos: [S, N, C] (with ``batch_first``: [N, Q, C]
        and [N, S, C]); mask: bool [N, S]; self_attn_mask: bool [Q, Q], True where query i must
        not attend to query j (training-only query groups), or None."""
        cross = (memory, memory_key_padding_mask, pos, query_pos, batch_first)
        if self.normalize_before:
            tgt = tgt + self.dropout1(
                self._self_attend(self.norm1(tgt), query_pos, self_attn_mask, batch_first)
            )
            tgt = tgt + self.dropout2(self._cross_attend(self.norm2(tgt), *cross))
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        tgt = self.norm1(
            tgt + self.dropout1(self._self_attend(tgt, query_pos, self_attn_mask, batch_first))
        )
        tgt = self.norm2(tgt + self.dropout2(self._cross_attend(tgt, *cross)))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int, norm: nn.Module | None):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm  # only with pre-norm: post-norm layers already end with a LayerNorm

    def forward(self, src, key_padding_mask, pos, batch_first=False):
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos, batch_first)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    def __init__(
        self, layer: nn.Module, num_layers: int, norm: nn.Module, return_intermediate: bool
    ):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(
        self,
        tgt,
        memory,
        memory_key_padding_mask,
        pos,
        query_pos,
        self_attn_mask=None,
        batch_first=False,
    ) -> torch.Tensor:
        """Returns [L, Q, N, C] ([L, N, Q, C] with ``batch_first``): every layer's normed output
        (L = num_layers) or the last only."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(
                tgt, memory, memory_key_padding_mask, pos, query_pos, self_attn_mask, batch_first
            )
            if self.return_intermediate:
                intermediate.append(self.norm(tgt))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self.norm(tgt).unsqueeze(0)


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the learned object queries."""

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
        return_intermediate_dec: bool = False,
        attention_fp32: bool = False,
    ):
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(
                f"MODEL.DETR.HIDDEN_DIM ({d_model}) must be divisible by MODEL.DETR.NHEADS ({nhead})."
            )
        encoder_layer = TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, normalize_before, attention_fp32
        )
        self.encoder = TransformerEncoder(
            encoder_layer, num_encoder_layers, nn.LayerNorm(d_model) if normalize_before else None
        )
        decoder_layer = TransformerDecoderLayer(
            d_model, nhead, dim_feedforward, dropout, normalize_before, attention_fp32
        )
        self.decoder = TransformerDecoder(
            decoder_layer, num_decoder_layers, nn.LayerNorm(d_model), return_intermediate_dec
        )
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def _reset_parameters(self):
        # official init: Xavier-uniform for every matrix, PyTorch defaults for the rest
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor,
        query_embed: torch.Tensor,
        pos_embed: torch.Tensor,
        self_attn_mask: torch.Tensor | None = None,
        query_content: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            src: [N, C, H, W] projected backbone features.
            mask: bool [N, H, W], True on padding.
            query_embed: [Q, C] learned object queries (added as positions in every decoder
                layer), or [N, Q, C] queries of each image (training-only denoising queries).
            pos_embed: [N, C, H, W] spatial position encoding.
            self_attn_mask: bool [Q, Q] mask of the decoder's query self-attention (True =
                blocked), e.g. between training-only query groups; None for plain DETR.
            query_content: [N, Q, C] decoder input; None: zeros, as plain DETR.
        Returns:
            hs: [L, N, Q, C] decoder outputs (L = decoder layers, or 1 without intermediates);
            memory: [N, C, H, W] encoder output.
        """
        n, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # [S, N, C]
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)  # [S, N, C]
        if query_embed.dim() == 2:
            query_embed = query_embed.unsqueeze(1).repeat(1, n, 1)  # [Q, N, C]
        else:
            query_embed = query_embed.transpose(0, 1)
        mask = mask.flatten(1)  # [N, S]
        if query_content is None:  # decoder input is zeros; queries enter as positions
            tgt = torch.zeros_like(query_embed)
        else:
            tgt = query_content.transpose(0, 1)
        batch_first = self.training
        if batch_first:  # [N, S, C] and [N, Q, C] views
            src, pos_embed, query_embed, tgt = (
                x.transpose(0, 1) for x in (src, pos_embed, query_embed, tgt)
            )
        memory = self.encoder(src, mask, pos_embed, batch_first)
        hs = self.decoder(tgt, memory, mask, pos_embed, query_embed, self_attn_mask, batch_first)
        if not batch_first:
            hs, memory = hs.transpose(1, 2), memory.transpose(0, 1)
        return hs, memory.permute(0, 2, 1).reshape(n, c, h, w)


def build_transformer(cfg) -> Transformer:
    """The encoder-decoder of ``cfg.MODEL.DETR``. Deep supervision is set here once
    (``LOSS.DEEP_SUPERVISION``: every decoder layer's output is returned); the criterion's auxiliary
    weights and the model's auxiliary outputs follow it."""
    detr = cfg.MODEL.DETR
    return Transformer(
        d_model=detr.HIDDEN_DIM,
        nhead=detr.NHEADS,
        num_encoder_layers=detr.ENC_LAYERS,
        num_decoder_layers=detr.DEC_LAYERS,
        dim_feedforward=detr.DIM_FEEDFORWARD,
        dropout=detr.DROPOUT,
        normalize_before=detr.PRE_NORM,
        return_intermediate_dec=detr.LOSS.DEEP_SUPERVISION,
        attention_fp32=attention_in_fp32(detr.SPEED.ATTENTION_PRECISION, cfg.MODEL.DEVICE),
    )


def num_aux_layers(transformer: Transformer) -> int:
    """The decoder layers before the last whose outputs are supervised: L - 1 when the decoder
    returns every layer's output (deep supervision, the paper's auxiliary decoding losses,
    Sec. 3.2), else 0."""
    decoder = transformer.decoder
    return len(decoder.layers) - 1 if decoder.return_intermediate else 0
