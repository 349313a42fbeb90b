# Importing these modules registers the backbone and the meta-architecture with Detectron2.
from .backbone import build_detr_resnet_backbone
from .criterion import SetCriterion
from .detr import MLP, Detr
from .matcher import HungarianMatcher
from .transformer import Transformer

__all__ = ["Detr", "MLP", "HungarianMatcher", "SetCriterion", "Transformer", "build_detr_resnet_backbone"]
