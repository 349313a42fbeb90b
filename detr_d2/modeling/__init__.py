# Importing these modules registers the backbone and the meta-architecture with Detectron2.
from .backbone import build_detr_resnet_backbone
from .criterion import LossBranch, SetCriterion
from .detr import Detr
from .heads import MLP
from .matcher import HungarianMatcher
from .postprocessing import (
    detection_inference,
    instance_inference,
    panoptic_inference,
    semantic_inference,
)
from .segmentation import MaskAttentionMap, MaskHead
from .training_aids import TrainingAid
from .transformer import Transformer

__all__ = [
    "Detr",
    "MLP",
    "HungarianMatcher",
    "LossBranch",
    "MaskAttentionMap",
    "MaskHead",
    "SetCriterion",
    "TrainingAid",
    "Transformer",
    "build_detr_resnet_backbone",
    "detection_inference",
    "instance_inference",
    "panoptic_inference",
    "semantic_inference",
]
