"""detr_d2: DETR (DEtection TRansformer) as a Detectron2 plugin."""

# Importing `modeling` registers the DETR meta-architecture and backbone with Detectron2.
from . import modeling
from .checkpoint import DetrCheckpointer, convert_official_state_dict, safe_torch_load
from .config import add_detr_config
from .layout import ClassLayout, layout_from_cfg

__all__ = [
    "ClassLayout",
    "DetrCheckpointer",
    "add_detr_config",
    "convert_official_state_dict",
    "layout_from_cfg",
    "modeling",
    "safe_torch_load",
]
