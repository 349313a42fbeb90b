"""Detectron2 ResNets with torchvision's layout, as the official DETR checkpoints expect, and the
padding mask of a backbone feature map."""

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet, build_resnet_backbone
from detectron2.structures import ImageList

from .postprocessing import image_sizes_tensor

_BASIC_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}

# Training batches are padded to a multiple of this (inference: to the largest image, as the
# official batching). With varied image sizes every new batch shape makes oneDNN create new
# convolution kernels; multiples of 32 leave few shapes (the sample's step ~20 % faster). The
# padding is masked, so the model sees the same images.
TRAIN_SIZE_DIVISIBILITY = 32


def _build_basic_block_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet-18/34 of any width: ``RESNETS.STEM_OUT_CHANNELS`` and ``RES2_OUT_CHANNELS`` (doubled
    at each stage) are free here, where Detectron2 insists on 64. Narrow variants make small
    CPU models (see configs/detr_face_sample.yaml); with 64 this is Detectron2's R18/R34."""
    resnets = cfg.MODEL.RESNETS
    if resnets.RES5_DILATION != 1:
        raise ValueError("MODEL.RESNETS.RES5_DILATION must be 1 for ResNet-18/34 (no DC5 variant).")
    stem = BasicStem(input_shape.channels, resnets.STEM_OUT_CHANNELS, norm=resnets.NORM)
    in_channels, out_channels, stages = resnets.STEM_OUT_CHANNELS, resnets.RES2_OUT_CHANNELS, []
    for i, num_blocks in enumerate(_BASIC_BLOCKS_PER_STAGE[resnets.DEPTH]):
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                num_blocks,
                stride_per_block=[1 if i == 0 else 2] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=resnets.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(
        stem, stages, out_features=resnets.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )


@BACKBONE_REGISTRY.register()
def build_detr_resnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet, with the first res5 block undilated when ``RES5_DILATION`` is 2.

    Official DETR-DC5 uses torchvision's ``replace_stride_with_dilation``: the first block of
    layer4 drops the stride but keeps dilation 1, and only the later blocks use dilation 2.
    Detectron2 dilates every res5 block, which shifts the receptive field of the first one.
    Use with ``RESNETS.STRIDE_IN_1X1 False`` (stride on the 3x3 conv, as torchvision) and
    ``RESNETS.NORM "FrozenBN"``.
    """
    if cfg.MODEL.RESNETS.DEPTH in _BASIC_BLOCKS_PER_STAGE:
        return _build_basic_block_resnet(cfg, input_shape)
    backbone = build_resnet_backbone(cfg, input_shape)
    if cfg.MODEL.RESNETS.RES5_DILATION == 2:
        conv = backbone.res5[0].conv2
        conv.dilation = (1, 1)
        conv.padding = (1, 1)
    return backbone


def padding_mask(images: ImageList, size: tuple[int, int]) -> torch.Tensor:
    """bool [N, h, w], True on padding, for a feature map of ``size``.

    As the official implementation: built at input resolution from the unpadded sizes, then
    sampled with nearest interpolation to the feature map (a few padded rows can vanish).
    ``images.image_sizes`` may be an int64 tensor [N, 2] (exported graphs, see
    :mod:`detr_d2.export`) so that nothing in this path leaves the graph.
    """
    tensor = images.tensor
    heights_widths = image_sizes_tensor(images.image_sizes, tensor.device)  # [N, 2]
    ys = torch.arange(tensor.shape[-2], device=tensor.device)
    xs = torch.arange(tensor.shape[-1], device=tensor.device)
    mask = (ys[None, :, None] >= heights_widths[:, 0, None, None]) | (
        xs[None, None, :] >= heights_widths[:, 1, None, None]
    )  # [N, H, W]
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]
