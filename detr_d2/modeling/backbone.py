"""Detectron2 ResNet with torchvision's layout, as the official DETR checkpoints expect."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone


@BACKBONE_REGISTRY.register()
def build_detr_resnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet, with the first res5 block undilated when ``RES5_DILATION`` is 2.

    Official DETR-DC5 uses torchvision's ``replace_stride_with_dilation``: the first block of
    layer4 drops the stride but keeps dilation 1, and only the later blocks use dilation 2.
    Detectron2 dilates every res5 block, which shifts the receptive field of the first one.
    Use with ``RESNETS.STRIDE_IN_1X1 False`` (stride on the 3x3 conv, as torchvision) and
    ``RESNETS.NORM "FrozenBN"``.
    """
    backbone = build_resnet_backbone(cfg, input_shape)
    if cfg.MODEL.RESNETS.RES5_DILATION == 2:
        conv = backbone.res5[0].conv2
        conv.dilation = (1, 1)
        conv.padding = (1, 1)
    return backbone
