"""Datasets named in the config, and the checks DETR's training data gets before use."""

import functools
import logging

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..layout import (
    OFFICIAL_DETECTION_ROWS,
    OFFICIAL_PANOPTIC_ROWS,
    layout_from_cfg,
    official_class_rows,
)
from .categories import choose_categories, read_categories
from .coco_json import load_coco_detection_json
from .panoptic import register_coco_panoptic_from_cfg
from .registration import needs_registration

logger = logging.getLogger(__name__)


def register_datasets_from_cfg(cfg: CfgNode) -> list[str]:
    """Register every ``[name, json_file, image_root]`` of ``DATASETS.REGISTER_COCO`` (and the
    panoptic datasets of ``DATASETS.REGISTER_COCO_PANOPTIC``, see
    :func:`~detr_d2.data.panoptic.register_coco_panoptic_from_cfg`).

    Missing files fail here, naming the path and the config key, rather than later inside the
    data loader. The categories that become classes are chosen now against
    ``MODEL.DETR.NUM_CLASSES`` (:func:`~detr_d2.data.categories.choose_categories`, decided by
    the training set and kept for the other sets that have those ids), and set in the metadata,
    so the model's class layout is known before any data is loaded. Registering the same name
    again with the same files is a no-op (each process of a multi-GPU run calls this).
    """
    names = register_coco_panoptic_from_cfg(cfg)  # DATASETS.REGISTER_COCO_PANOPTIC
    pending = []
    for i, entry in enumerate(cfg.DATASETS.REGISTER_COCO):
        key = f"DATASETS.REGISTER_COCO[{i}]"
        if not (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(isinstance(x, str) for x in entry)
        ):
            raise ValueError(
                f"{key} must be [name, json_file, image_root] (three strings), got {entry!r}."
            )
        name, json_file, image_root = entry
        files = [("annotation file", json_file, "file"), ("image folder", image_root, "folder")]
        if needs_registration(key, name, files, {"json_file": json_file, "image_root": image_root}):
            pending.append(
                (name, json_file, image_root, read_categories(json_file, f"{name!r} ({json_file})"))
            )
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    train = [p for p in pending if p[0] in cfg.DATASETS.TRAIN]
    chosen = choose_categories(train[0][3], num_classes) if train else None
    for name, json_file, image_root, summary in pending:
        if chosen is None or not set(chosen) <= set(summary.names):
            ids = choose_categories(summary, num_classes or len(chosen or ()))
        else:
            ids = chosen
        DatasetCatalog.register(
            name,
            functools.partial(
                load_coco_detection_json, json_file, image_root, name, category_ids=ids
            ),
        )
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=[summary.names[i] for i in ids],
            thing_dataset_id_to_contiguous_id={cid: c for c, cid in enumerate(ids)},
        )
        names.append(name)
        logger.info(f"Registered COCO-format dataset {name!r}: {json_file}, images in {image_root}")
    return names


def drop_degenerate_boxes(dataset_dicts: list[dict], dataset_name: str = "") -> list[dict]:
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


def coco_class_rows(cfg: CfgNode) -> list[int] | None:
    """COCO category id of each class, when the model has Detectron2's 80 COCO classes (rows of
    an official 92-row head) or its 133 COCO panoptic classes (rows of a 251-row head); ``None``
    for other class counts."""
    rows = {80: OFFICIAL_DETECTION_ROWS, 133: OFFICIAL_PANOPTIC_ROWS}.get(
        cfg.MODEL.DETR.NUM_CLASSES
    )
    return official_class_rows(layout_from_cfg(cfg), rows) if rows else None
