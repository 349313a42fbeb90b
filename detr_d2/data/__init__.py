from .dataset_mapper import DetrDatasetMapper
from .datasets import coco_class_rows, drop_degenerate_boxes, register_datasets_from_cfg

__all__ = ["DetrDatasetMapper", "coco_class_rows", "drop_degenerate_boxes", "register_datasets_from_cfg"]
