from .dataset_mapper import DetrDatasetMapper
from .datasets import coco_class_rows, drop_degenerate_boxes, register_datasets_from_cfg
from .panoptic import register_coco_panoptic_from_cfg, thing_ids_from_cfg

__all__ = [
    "DetrDatasetMapper",
    "coco_class_rows",
    "drop_degenerate_boxes",
    "register_coco_panoptic_from_cfg",
    "register_datasets_from_cfg",
    "thing_ids_from_cfg",
]
