"""DETR's mask head (paper Sec. 4.4, Fig. 8) and its losses.

Each query's final decoder embedding attends over the encoder memory (one attention map per
head); a small FPN-style convolutional head turns those maps, together with the projected
stride-32 features and the backbone's res4/res3/res2 maps, into one mask logit map per query at
1/4 of the padded input resolution.

Shapes: N images, Q queries, C hidden dim, M attention heads, H x W the transformer's feature
map, H4 x W4 the res2 map (1/4 of the padded input).

Module and parameter names follow the official ``DETRsegm`` (``bbox_attention.*``,
``mask_head.lay1..5, gn1..5, out_lay, adapter1..3``), so official panoptic checkpoints load as
they are.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.structures import BitMasks, Instances, PolygonMasks
from torch import nn

__all__ = [
    "MaskAttentionMap",
    "MaskHead",
    "MASK_HEAD_IN_FEATURES",
    "sigmoid_focal_loss",
    "sigmoid_focal_terms",
    "dice_loss",
    "freeze_all_but_mask_heads",
]

# Backbone maps the head adds back in, coarse to fine (official: layer3, layer2, layer1).
MASK_HEAD_IN_FEATURES = ("res4", "res3", "res2")
# GroupNorm groups of the official head; narrower test/demo heads use the largest divisor.
_GROUPS = 8


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(_GROUPS, channels), channels)


def _repeat_per_query(x: torch.Tensor, num_queries: int) -> torch.Tensor:
    """[N, C, H, W] -> [N*Q, C, H, W], image-major (query q of image n at n*Q + q)."""
    return x.unsqueeze(1).expand(-1, num_queries, -1, -1, -1).flatten(0, 1)


class MaskAttentionMap(nn.Module):
    """Attention weights of each query over the encoder memory, per head (no values).

    Official ``MHAttentionMap``: the scaled dot products of all heads and positions of one query
    go through a single softmax (over ``M*H*W`` entries, padded positions excluded), so the M maps
    of a query sum to 1 together.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(
                f"hidden dim {dim} must be divisible by the number of heads {num_heads}"
            )
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.k_linear = nn.Linear(dim, dim)
        self.scale = float(dim / num_heads) ** -0.5
        for linear in (self.q_linear, self.k_linear):  # official init
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            queries: [N, Q, C] final decoder outputs.
            memory: [N, C, H, W] encoder output.
            padding_mask: bool [N, H, W], True on padded positions.
        Returns:
            [N, Q, M, H, W] attention weights.
        """
        n, c, h, w = memory.shape
        m = self.num_heads
        q = self.q_linear(queries).view(n, -1, m, c // m)  # [N, Q, M, C/M]
        k = self.k_linear(memory.flatten(2).transpose(1, 2))  # [N, HW, C]
        k = k.transpose(1, 2).reshape(n, m, c // m, h, w)  # [N, M, C/M, H, W]
        weights = torch.einsum("nqmc,nmchw->nqmhw", q * self.scale, k)
        weights = weights.masked_fill(padding_mask[:, None, None], float("-inf"))
        return F.softmax(weights.flatten(2), dim=-1).view(weights.shape)


class MaskHead(nn.Module):
    """Official ``MaskHeadSmallConv``: 3x3 conv + GroupNorm + ReLU blocks, upsampled (nearest)
    and summed with 1x1-adapted backbone maps at strides 16, 8 and 4, then one output channel."""

    def __init__(self, hidden_dim: int, num_heads: int, fpn_channels: Sequence[int]):
        """
        Args:
            hidden_dim: C, the channels of the projected features (also sets the head widths
                C/2, C/4, C/8, C/16 as the official head).
            num_heads: M, the attention maps concatenated to the features.
            fpn_channels: channels of the res4, res3, res2 maps.
        """
        super().__init__()
        dim = hidden_dim + num_heads
        widths = [dim, hidden_dim // 2, hidden_dim // 4, hidden_dim // 8, hidden_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = _group_norm(dim)
        self.lay2 = nn.Conv2d(dim, widths[1], 3, padding=1)
        self.gn2 = _group_norm(widths[1])
        self.lay3 = nn.Conv2d(widths[1], widths[2], 3, padding=1)
        self.gn3 = _group_norm(widths[2])
        self.lay4 = nn.Conv2d(widths[2], widths[3], 3, padding=1)
        self.gn4 = _group_norm(widths[3])
        self.lay5 = nn.Conv2d(widths[3], widths[4], 3, padding=1)
        self.gn5 = _group_norm(widths[4])
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_channels[0], widths[1], 1)
        self.adapter2 = nn.Conv2d(fpn_channels[1], widths[2], 1)
        self.adapter3 = nn.Conv2d(fpn_channels[2], widths[3], 1)
        for module in self.modules():  # official init
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(
        self, features: torch.Tensor, attention: torch.Tensor, fpn_features: list[torch.Tensor]
    ) -> torch.Tensor:
        """
        Args:
            features: [N, C, H, W] projected backbone features (the transformer's input).
            attention: [N, Q, M, H, W] from :class:`MaskAttentionMap`.
            fpn_features: the res4, res3, res2 maps, [N, C_i, H_i, W_i] each.
        Returns:
            [N, Q, H4, W4] mask logits at the resolution of the last (res2) map.
        """
        n, q = attention.shape[:2]
        x = torch.cat(
            [_repeat_per_query(features, q), attention.flatten(0, 1)], 1
        )  # [N*Q, C+M, H, W]
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        blocks = [
            (self.adapter1, self.lay3, self.gn3),
            (self.adapter2, self.lay4, self.gn4),
            (self.adapter3, self.lay5, self.gn5),
        ]
        for (adapter, conv, norm), fpn in zip(blocks, fpn_features):
            fpn = _repeat_per_query(adapter(fpn), q)  # [N*Q, C_i', H_i, W_i]
            x = fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        x = self.out_lay(x)  # [N*Q, 1, H4, W4]
        return x.view(n, q, *x.shape[-2:])


def build_mask_heads(
    shapes: dict[str, ShapeSpec], hidden_dim: int, nhead: int
) -> tuple[MaskAttentionMap, MaskHead]:
    """``bbox_attention`` and ``mask_head`` of a transformer of width ``hidden_dim`` with
    ``nhead`` heads, on the backbone outputs res2..res4 (``shapes``: all backbone outputs)."""
    missing = [f for f in MASK_HEAD_IN_FEATURES if f not in shapes]
    if missing:
        raise ValueError(
            f"MODEL.MASK_ON needs the backbone outputs {list(MASK_HEAD_IN_FEATURES)}, "
            f"missing {missing}: set MODEL.RESNETS.OUT_FEATURES "
            "['res2', 'res3', 'res4', 'res5']."
        )
    channels = [shapes[f].channels for f in MASK_HEAD_IN_FEATURES]
    return MaskAttentionMap(hidden_dim, nhead), MaskHead(hidden_dim, nhead, channels)


def freeze_all_but_mask_heads(model: nn.Module) -> None:
    """Official stage 2 (``--frozen_weights``): only ``model.bbox_attention`` and
    ``model.mask_head`` train, and the backbone's batch norms become ``FrozenBatchNorm2d`` so that
    their statistics stay those of the stage-1 model (the official backbone freezes them anyway)."""
    model.backbone = FrozenBatchNorm2d.convert_frozen_batchnorm(model.backbone)
    for name, parameter in model.named_parameters():
        if not name.startswith(("bbox_attention.", "mask_head.")):
            parameter.requires_grad_(False)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_boxes: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) per pixel, averaged over pixels, summed over masks, divided
    by ``num_boxes`` (official DETR). logits, targets: [M, P] (targets in {0, 1})."""
    return sigmoid_focal_terms(logits, targets, alpha, gamma).mean(1).sum() / num_boxes


def sigmoid_focal_terms(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """The focal loss of every element (any shape; targets in [0, 1]), not reduced."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** gamma


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float) -> torch.Tensor:
    """1 - soft Dice coefficient with +1 smoothing (official DETR), summed over masks, divided by
    ``num_boxes``. logits, targets: [M, P]."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def gt_mask_tensor(
    instances: Instances, padded_size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """uint8 [G, H, W] masks of ``instances.gt_masks`` (bit masks or polygons) on ``device``,
    zero-padded at the bottom and right to ``padded_size``."""
    height, width = instances.image_size
    if not instances.has("gt_masks"):
        if len(instances):
            raise ValueError(
                "MODEL.MASK_ON needs ground-truth masks: the dataset mapper gave instances "
                "without gt_masks (use a dataset with segmentations, or set MODEL.MASK_ON "
                "False)."
            )
        masks = torch.zeros((0, height, width), dtype=torch.uint8, device=device)
    elif isinstance(instances.gt_masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(instances.gt_masks, height, width).tensor
    else:
        masks = instances.gt_masks.tensor
    masks = masks.to(device=device, dtype=torch.uint8)
    pad_bottom, pad_right = padded_size[0] - masks.shape[-2], padded_size[1] - masks.shape[-1]
    return F.pad(masks, (0, pad_right, 0, pad_bottom))
