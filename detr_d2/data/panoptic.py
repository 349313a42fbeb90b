"""COCO panoptic data for DETR: dataset registration from the config, training targets from
panoptic PNGs, and the class layouts the model and the checkpoint loader need.

Class ids: Detectron2's "standard" COCO panoptic layout (``coco_2017_*_panoptic``, not
``*_panoptic_separated``) gives things and stuff one contiguous range, things first: 133 COCO
classes, things 0..79, stuff 80..132. Datasets registered through
``DATASETS.REGISTER_COCO_PANOPTIC`` get the same layout (things first, in the json's order).
Official panoptic checkpoints index their 251-row class head by COCO panoptic category id
(things 1..90, stuff 92..200, row 250 "no object").
"""

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, Boxes, Instances

from ..layout import layout_from_cfg
from .registration import needs_registration

__all__ = [
    "OFFICIAL_PANOPTIC_NUM_CLASSES",
    "load_coco_panoptic",
    "panoptic_metadata",
    "panoptic_to_instances",
    "register_coco_panoptic_from_cfg",
    "rgb2id",
    "thing_ids_from_cfg",
]

logger = logging.getLogger(__name__)

# Classes of the official panoptic checkpoints' own layout (logit i = COCO panoptic id i).
OFFICIAL_PANOPTIC_NUM_CLASSES = 250
_KEY = "DATASETS.REGISTER_COCO_PANOPTIC"


def rgb2id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG [H, W, 3] uint8 -> segment ids [H, W] int64: R + 256 G + 256^2 B."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def thing_ids_from_cfg(cfg: CfgNode) -> list[int] | None:
    """The model's classes that are things, or None when every class is a thing (from the
    model's class layout, :func:`detr_d2.layout.layout_from_cfg`)."""
    layout = layout_from_cfg(cfg)
    return None if layout.all_things else list(layout.thing_ids)


def panoptic_metadata(categories: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Detectron2 metadata of a COCO panoptic ``categories`` list in the standard layout: things
    first, then stuff, each in the json's order, so that one contiguous id indexes both
    ``thing_classes`` (the things only, as ``COCOEvaluator`` expects) and ``stuff_classes``
    (every class, as ``Visualizer.draw_panoptic_seg`` expects); colours likewise."""
    ordered = [c for c in categories if c.get("isthing", 0)] + [
        c for c in categories if not c.get("isthing", 0)
    ]
    rng = np.random.default_rng(0)  # fixed colours for categories without one
    colors = [
        list(c["color"]) if "color" in c else rng.integers(0, 256, 3).tolist() for c in ordered
    ]
    names = [c["name"] for c in ordered]
    num_things = sum(1 for c in ordered if c.get("isthing", 0))
    return {
        "thing_classes": names[:num_things],
        "thing_colors": colors[:num_things],
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(ordered) if c.get("isthing", 0)
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(ordered) if not c.get("isthing", 0)
        },
    }


def load_coco_panoptic(
    panoptic_json: str, image_root: str, panoptic_root: str, meta: dict[str, Any]
) -> list[dict]:
    """Dataset dicts of a COCO panoptic json: ``file_name`` (from the json's ``images``, so any
    image extension works), ``image_id``, ``height``, ``width``, ``pan_seg_file_name`` and
    ``segments_info`` with contiguous ``category_id`` and ``isthing``."""
    with open(panoptic_json) as f:
        data = json.load(f)
    images = {image["id"]: image for image in data["images"]}
    things, stuff = (
        meta["thing_dataset_id_to_contiguous_id"],
        meta["stuff_dataset_id_to_contiguous_id"],
    )
    records = []
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        segments = []
        for segment in ann["segments_info"]:
            category = segment["category_id"]
            if category not in things and category not in stuff:
                raise KeyError(
                    f"{panoptic_json}: segment {segment['id']} of image {ann['image_id']} has "
                    f"category_id {category}, which is not in the json's categories."
                )
            isthing = category in things
            segments.append(
                dict(segment, category_id=(things if isthing else stuff)[category], isthing=isthing)
            )
        records.append(
            {
                "file_name": os.path.join(image_root, image["file_name"]),
                "image_id": ann["image_id"],
                "height": image["height"],
                "width": image["width"],
                "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
                "segments_info": segments,
            }
        )
    return records


def register_coco_panoptic_from_cfg(cfg: CfgNode) -> list[str]:
    """Register every ``[name, image_root, panoptic_root, panoptic_json(, instances_json)]`` of
    ``DATASETS.REGISTER_COCO_PANOPTIC`` (metadata as Detectron2's ``register_coco_panoptic``,
    evaluator type "coco_panoptic_seg"). Missing files fail here with the key and the path;
    registering the same name with the same files again is a no-op."""
    names = []
    for i, entry in enumerate(cfg.DATASETS.REGISTER_COCO_PANOPTIC):
        key = f"{_KEY}[{i}]"
        if not (
            isinstance(entry, (list, tuple))
            and len(entry) in (4, 5)
            and all(isinstance(x, str) for x in entry)
        ):
            raise ValueError(
                f"{key} must be [name, image_root, panoptic_root, panoptic_json] or with a fifth "
                f"string, instances_json; got {entry!r}."
            )
        name, image_root, panoptic_root, panoptic_json = entry[:4]
        instances_json = entry[4] if len(entry) == 5 and entry[4] else None
        files = [
            ("image folder", image_root, "folder"),
            ("panoptic PNG folder", panoptic_root, "folder"),
            ("panoptic json", panoptic_json, "file"),
            ("instances json", instances_json, "file"),
        ]
        identity = {"panoptic_json": panoptic_json, "image_root": image_root}
        if not needs_registration(key, name, files, identity):
            continue
        with open(panoptic_json) as f:
            meta = panoptic_metadata(json.load(f)["categories"])
        DatasetCatalog.register(
            name,
            lambda j=panoptic_json, i=image_root, p=panoptic_root, m=meta: load_coco_panoptic(
                j, i, p, m
            ),
        )
        MetadataCatalog.get(name).set(
            panoptic_root=panoptic_root,
            image_root=image_root,
            panoptic_json=panoptic_json,
            json_file=instances_json,
            evaluator_type="coco_panoptic_seg",
            ignore_label=255,
            label_divisor=1000,
            **meta,
        )
        names.append(name)
        logger.info(
            f"Registered COCO panoptic dataset {name!r}: {panoptic_json}, images in {image_root}"
        )
    return names


def check_panoptic_ids(
    segment_ids: np.ndarray, segments_info: Sequence[dict[str, Any]], file_name: str, image_id: Any
) -> None:
    """Fail, naming the PNG and the image id, when the PNG's segment ids (0 = void) and the
    ``segments_info`` ids differ: a segment listed but absent would silently lose its target,
    and pixels of an unlisted id would silently become "no object"."""
    in_png = set(np.unique(segment_ids).tolist()) - {0}
    listed = {s["id"] for s in segments_info}
    if in_png != listed:
        raise ValueError(
            f"image id {image_id}: panoptic PNG {file_name} does not match its segments_info: "
            f"ids only in the PNG {sorted(in_png - listed)[:10]}, only in segments_info "
            f"{sorted(listed - in_png)[:10]}."
        )


def panoptic_to_instances(
    segment_ids: np.ndarray, segments_info: Sequence[dict[str, Any]], with_masks: bool
) -> Instances:
    """Training targets of one (augmented) panoptic image: one instance per non-crowd segment
    still present, with ``gt_classes``, ``gt_boxes`` (XYXY pixels) and, with ``with_masks``,
    ``gt_masks`` (``BitMasks``).

    Args:
        segment_ids: [H, W] segment id of each pixel (see :func:`rgb2id`).
        segments_info: the record's segments (``id``, contiguous ``category_id``, ``iscrowd``).
    """
    image_shape = segment_ids.shape[:2]
    ids = torch.from_numpy(np.ascontiguousarray(segment_ids))
    kept = [s for s in segments_info if not s.get("iscrowd", 0)]  # official: no crowd targets
    masks = (
        torch.stack([ids == s["id"] for s in kept])
        if kept
        else torch.zeros((0, *image_shape), dtype=torch.bool)
    )
    present = masks.flatten(1).any(1)  # segments a crop removed entirely have no target
    masks = masks[present]
    classes = [s["category_id"] for s, p in zip(kept, present.tolist()) if p]
    instances = Instances(image_shape)
    instances.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
    bit_masks = BitMasks(masks)
    # the tight box of the augmented mask: a crop can cut a segment, and the json's box is
    # that of the original image
    instances.gt_boxes = Boxes(bit_masks.get_bounding_boxes().tensor)
    if with_masks:
        instances.gt_masks = bit_masks
    return instances
