"""Datasets named in the config, and the checks DETR's training data gets before use."""
import functools
import logging
from typing import Dict, List, Optional

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .coco_json import load_coco_detection_json
from .registration import needs_registration
from .panoptic import coco_panoptic_class_rows, register_coco_panoptic_from_cfg

logger = logging.getLogger(__name__)


def register_datasets_from_cfg(cfg: CfgNode) -> List[str]:
    """Register every ``[name, json_file, image_root]`` of ``DATASETS.REGISTER_COCO`` (and the
    panoptic datasets of ``DATASETS.REGISTER_COCO_PANOPTIC``, see
    :func:`~detr_d2.data.panoptic.register_coco_panoptic_from_cfg`).

    Missing files fail here, naming the path and the config key, rather than later inside the
    data loader. Registering the same name again with the same files is a no-op (each process
    of a multi-GPU run calls this).
    """
    names = register_coco_panoptic_from_cfg(cfg)  # DATASETS.REGISTER_COCO_PANOPTIC
    for i, entry in enumerate(cfg.DATASETS.REGISTER_COCO):
        key = f"DATASETS.REGISTER_COCO[{i}]"
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(x, str) for x in entry)):
            raise ValueError(f"{key} must be [name, json_file, image_root] (three strings), got {entry!r}.")
        name, json_file, image_root = entry
        files = [("annotation file", json_file, "file"), ("image folder", image_root, "folder")]
        if not needs_registration(key, name, files, {"json_file": json_file, "image_root": image_root}):
            continue
        DatasetCatalog.register(name, functools.partial(load_coco_detection_json, json_file, image_root, name))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
        names.append(name)
        logger.info(f"Registered COCO-format dataset {name!r}: {json_file}, images in {image_root}")
    return names


def drop_degenerate_boxes(dataset_dicts: List[Dict], dataset_name: str = "") -> List[Dict]:
    """Remove annotations whose box has zero or negative width or height, and log how many.

    Such boxes have no valid normalized cxcywh form for the L1/GIoU losses. Images stay, even if
    they lose every annotation: images without objects are valid DETR training samples.
    """
    dropped, examples = 0, []
    for record in dataset_dicts:
        annotations = record.get("annotations")
        if not annotations:
            continue
        kept = []
        for ann in annotations:
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            if x1 > x0 and y1 > y0:
                kept.append(ann)
            else:
                dropped += 1
                if len(examples) < 5:
                    examples.append(f"image {record.get('image_id')} bbox {list(ann['bbox'])}")
        record["annotations"] = kept
    if dropped:
        logger.warning(
            f"Dropped {dropped} annotation(s) with zero or negative size from "
            f"{dataset_name or 'the training set'} (e.g. {'; '.join(examples)})."
        )
    return dataset_dicts


def coco_class_rows(cfg: CfgNode) -> Optional[List[int]]:
    """Dataset category id of each contiguous class, when the model has COCO's 80 classes (or
    COCO panoptic's 133, see :func:`~detr_d2.data.panoptic.coco_panoptic_class_rows`).

    Official detection checkpoints index their 92-row class head by COCO category id, panoptic
    ones their 251-row head by COCO panoptic category id; this is the row to take for each of
    the model's classes. ``None`` when NUM_CLASSES is neither 80 nor 133.
    """
    if cfg.MODEL.DETR.NUM_CLASSES == 133:
        return coco_panoptic_class_rows(cfg)
    if cfg.MODEL.DETR.NUM_CLASSES != 80:
        return None
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        meta = MetadataCatalog.get(name)
        if not meta.get("thing_dataset_id_to_contiguous_id") and name in DatasetCatalog.list():
            DatasetCatalog.get(name)  # COCO-json datasets set the id mapping when loaded
        mapping = meta.get("thing_dataset_id_to_contiguous_id")
        if mapping and len(mapping) == 80:
            return [dataset_id for dataset_id, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    coco = MetadataCatalog.get("coco_2017_val")  # Detectron2's builtin COCO metadata
    mapping = coco.thing_dataset_id_to_contiguous_id
    return [dataset_id for dataset_id, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
