"""Read DETR's attention weights out of a model, for study and visualisation.

The DETR paper looks inside the model through two kinds of maps (Sec. 4.2, Fig. 3 and 6): the
encoder self-attention of one pixel over the image, and each object query's decoder
cross-attention over the image. :func:`capture_attention` records both during any forward of a
:class:`~detr_d2.modeling.Detr` (or subclass), without changing the model's code: the model calls
``nn.MultiheadAttention`` with ``need_weights=False`` (the fast path), and the hooks installed
here ask for the per-head weights only while the context is open.

Shapes: N images, M attention heads, Q object queries, h x w the transformer's input feature map,
S = h*w tokens (row-major over the feature map, padded positions included), H x W pixels.
"""

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "CapturedAttention",
    "capture_attention",
    "attention_to_image",
    "point_to_token",
    "valid_feature_size",
]

# nn.MultiheadAttention.forward's parameters in order, to move positional ones into kwargs
_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


@dataclass
class CapturedAttention:
    """Attention weights of the last forward pass run inside :func:`capture_attention`.

    Attributes:
        encoder_self_attn: one tensor per encoder layer, [N, M, S, S]: row = query token,
            column = key token; rows sum to 1, keys at padded positions get weight 0.
        decoder_cross_attn: one tensor per decoder layer, [N, M, Q, S]: object query over tokens.
        feature_size: (h, w) of the feature map the tokens come from.
        padding_mask: bool [N, h, w], True where a token lies on batch padding.
    """

    encoder_self_attn: list[torch.Tensor] = field(default_factory=list)
    decoder_cross_attn: list[torch.Tensor] = field(default_factory=list)
    feature_size: tuple[int, int] | None = None
    padding_mask: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        self._check_filled()
        return self.encoder_self_attn[0].shape[1]

    def _check_filled(self) -> None:
        if self.feature_size is None or not self.encoder_self_attn or not self.decoder_cross_attn:
            raise RuntimeError(
                "No attention was captured: run the model (e.g. model.predict_raw(inputs)) inside "
                "the `with capture_attention(model)` block first."
            )

    @staticmethod
    def _select(maps: list[torch.Tensor], layer: int, head: int | None, kind: str) -> torch.Tensor:
        """[N, rows, S] of one layer: one head, or the mean over heads (as nn.MultiheadAttention's
        ``average_attn_weights``) when ``head`` is None."""
        if not -len(maps) <= layer < len(maps):
            raise IndexError(
                f"{kind} layer {layer} out of range: the model has {len(maps)} layers."
            )
        weights = maps[layer]
        if head is None:
            return weights.mean(dim=1)
        if not -weights.shape[1] <= head < weights.shape[1]:
            raise IndexError(f"head {head} out of range: the model has {weights.shape[1]} heads.")
        return weights[:, head]

    def encoder_map(
        self, image_index: int, token: int, layer: int = -1, head: int | None = None
    ) -> torch.Tensor:
        """[h, w]: how the encoder token ``token`` (row-major index) attends over the map."""
        self._check_filled()
        weights = self._select(self.encoder_self_attn, layer, head, "encoder")
        return weights[image_index, token].reshape(self.feature_size)

    def decoder_map(
        self, image_index: int, query: int, layer: int = -1, head: int | None = None
    ) -> torch.Tensor:
        """[h, w]: how object query ``query`` attends over the encoder output (cross-attention)."""
        self._check_filled()
        weights = self._select(self.decoder_cross_attn, layer, head, "decoder")
        return weights[image_index, query].reshape(self.feature_size)

    def _reset(self, feature_size: tuple[int, int], padding_mask: torch.Tensor) -> None:
        self.encoder_self_attn.clear()
        self.decoder_cross_attn.clear()
        self.feature_size = feature_size
        self.padding_mask = padding_mask


def _argument(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs.get(name)


def _ask_for_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: per-head weights instead of the fast path's none."""
    kwargs = dict(kwargs)
    kwargs.update(zip(_MHA_ARGS[3:], args[3:]))  # positional extras -> keywords, so we can override
    kwargs.update(need_weights=True, average_attn_weights=False)
    return args[:3], kwargs


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[CapturedAttention]:
    """Record encoder self-attention and decoder cross-attention during forwards in the block.

    Example::

        with capture_attention(model) as attention:
            outputs = model.predict_raw(inputs)
        attention.decoder_cross_attn[-1]  # [N, M, Q, S]

    Each forward replaces what the previous one recorded. The hooks exist only inside the block,
    so a model outside it runs exactly as built. Inside it, attention takes PyTorch's explicit
    softmax path instead of the fused kernel: outputs agree to float rounding (about 1e-6).

    Args:
        model: a ``Detr`` (or subclass, or a DistributedDataParallel wrapping one).
    """
    model = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    transformer = model.transformer
    captured = CapturedAttention()

    def on_transformer_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        src = _argument(args, kwargs, 0, "src")  # [N, C, h, w]
        mask = _argument(args, kwargs, 1, "mask")  # [N, h, w]; Detr always passes one
        captured._reset(tuple(src.shape[-2:]), mask.detach().clone())

    def store_into(maps: list[torch.Tensor]):
        def on_output(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]):
            maps.append(output[1].detach())

        return on_output

    stacks = [
        ([layer.self_attn for layer in transformer.encoder.layers], captured.encoder_self_attn),
        (
            [layer.multihead_attn for layer in transformer.decoder.layers],
            captured.decoder_cross_attn,
        ),
    ]
    handles = []
    try:
        handles.append(
            transformer.register_forward_pre_hook(on_transformer_input, with_kwargs=True)
        )
        for modules, maps in stacks:
            for attention_module in modules:
                handles.append(
                    attention_module.register_forward_pre_hook(_ask_for_weights, with_kwargs=True)
                )
                handles.append(attention_module.register_forward_hook(store_into(maps)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- feature map <-> image geometry
def valid_feature_size(padding_mask: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of a [h, w] feature-map padding mask that cover the real image.

    Padding is at the bottom and right only (``ImageList``), so the real part is a top-left block.
    """
    rows = int((~padding_mask[:, 0]).sum())
    columns = int((~padding_mask[0, :]).sum())
    return max(rows, 1), max(columns, 1)


def attention_to_image(
    attention: torch.Tensor,
    padding_mask: torch.Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """An attention map over the feature map, as an image-aligned map over the real image.

    The tokens in the real part of the map (from the padding mask) are upsampled to the pixels
    they cover in the padded input (each token spans padded_size / feature size pixels), cut to
    the unpadded image and resized to ``output_size`` (e.g. the original image before the test
    resize).

    Args:
        attention: [h, w] weights over the feature map.
        padding_mask: bool [h, w], True on padding.
        image_size: (H, W) of the unpadded model input.
        padded_size: (H_pad, W_pad) of the padded batch the model saw.
        output_size: (H_out, W_out); default ``image_size``.
    Returns:
        float [H_out, W_out].
    """
    h, w = attention.shape
    rows, columns = valid_feature_size(padding_mask)
    scale_y, scale_x = padded_size[0] / h, padded_size[1] / w
    covered = (
        max(math.ceil(rows * scale_y), image_size[0]),
        max(math.ceil(columns * scale_x), image_size[1]),
    )
    block = attention[:rows, :columns].float()[None, None]  # [1, 1, rows, columns]
    pixels = F.interpolate(block, size=covered, mode="bilinear", align_corners=False)
    pixels = pixels[..., : image_size[0], : image_size[1]]
    if output_size is not None and tuple(output_size) != tuple(image_size):
        pixels = F.interpolate(
            pixels, size=tuple(output_size), mode="bilinear", align_corners=False
        )
    return pixels[0, 0]


def point_to_token(
    point_xy: Sequence[float],
    padding_mask: torch.Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    point_image_size: tuple[int, int] | None = None,
) -> tuple[int, int, int]:
    """The feature-map token under a pixel: (token index, row, column).

    Args:
        point_xy: (x, y) in pixels of an image of ``point_image_size`` (default ``image_size``),
            e.g. the original image before the test resize.
        padding_mask: bool [h, w] of that image, True on padding.
        image_size, padded_size: (H, W) of the unpadded model input and of the padded batch.
    """
    h, w = padding_mask.shape
    source = point_image_size or image_size
    x = point_xy[0] * image_size[1] / source[1]
    y = point_xy[1] * image_size[0] / source[0]
    rows, columns = valid_feature_size(padding_mask)
    row = min(max(int(y * h / padded_size[0]), 0), rows - 1)
    column = min(max(int(x * w / padded_size[1]), 0), columns - 1)
    return row * w + column, row, column
