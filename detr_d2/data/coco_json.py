"""Loading COCO-format detection datasets with every problem named: the file, the image id or
the annotation id, never a KeyError deep inside a loader and never a silent drop.

Fatal (``ValueError`` naming file and id): unreadable or invalid JSON, missing ``images`` or
``categories``, entries without their required fields, a category id absent from
``categories``, duplicate ids, an empty image list. Skipped with a count in the log:
annotations whose ``image_id`` has no image, polygons with fewer than 3 points. Warned:
a dataset without any annotation (valid for negatives), boxes reaching outside their image
(the mapper clips them).
"""

import json
import logging
import os
from collections.abc import Sequence

from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)


def _read_json(json_file: str) -> dict:
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{json_file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_file}: cannot be read ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{json_file}: expected a COCO json object with 'images', 'annotations' and 'categories'."
        )
    for field in ("images", "categories"):
        if not isinstance(data.get(field), list):
            raise ValueError(
                f"{json_file}: missing or invalid '{field}' list (required in COCO format)."
            )
    return data


def _require(entry: dict, fields: tuple[str, ...], what: str, json_file: str) -> None:
    missing = [f for f in fields if f not in entry]
    if missing:
        ident = f" id {entry['id']}" if "id" in entry else ""
        raise ValueError(
            f"{json_file}: {what}{ident} has no {', '.join(repr(m) for m in missing)} field."
        )


def _segmentation(ann: dict, json_file: str, counts: dict[str, int]) -> object | None:
    """Polygons with at least 3 points (others dropped and counted), or an RLE dict."""
    segm = ann.get("segmentation")
    if segm is None or isinstance(segm, dict):
        return segm
    polygons = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
    counts["invalid_polygons"] += len(segm) - len(polygons)
    return polygons or None


def _check_number(value, what: str, json_file: str) -> None:
    """Numbers given as strings ("480") fail naming the field, not deep inside a comparison."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        kind = "a string" if isinstance(value, str) else f"of type {type(value).__name__}"
        raise ValueError(f"{json_file}: {what} is {value!r}, {kind}; expected a number.")


def load_coco_detection_json(
    json_file: str, image_root: str, dataset_name: str, category_ids: Sequence[int] | None = None
) -> list[dict]:
    """COCO-format json -> Detectron2 dataset dicts (boxes ``XYWH_ABS``, contiguous category ids),
    and the dataset's ``thing_classes`` / ``thing_dataset_id_to_contiguous_id`` metadata.

    ``category_ids``: the categories that become classes 0..K-1, in order (default: all, sorted);
    an annotation of a category left out fails naming it.
    """
    data = _read_json(json_file)
    categories = data["categories"]
    for cat in categories:
        _require(cat, ("id", "name"), "category", json_file)
    all_ids = sorted(cat["id"] for cat in categories)
    if len(set(all_ids)) != len(all_ids):
        raise ValueError(f"{json_file}: duplicate category ids in 'categories'.")
    cat_ids = list(category_ids) if category_ids is not None else all_ids
    id_map = {cat_id: i for i, cat_id in enumerate(cat_ids)}
    names = {cat["id"]: cat["name"] for cat in categories}

    images = data["images"]
    if not images:
        raise ValueError(f"{json_file}: the dataset {dataset_name!r} has no images.")
    records: dict[object, dict] = {}
    for image in images:
        _require(image, ("id", "file_name"), "image", json_file)
        if image["id"] in records:
            raise ValueError(f"{json_file}: duplicate image id {image['id']}.")
        for size in ("height", "width"):
            _check_number(image.get(size), f"image id {image['id']} has {size!r}", json_file)
        records[image["id"]] = {
            "file_name": os.path.join(image_root, image["file_name"]),
            "height": image.get("height"),
            "width": image.get("width"),
            "image_id": image["id"],
            "annotations": [],
        }

    counts = {"orphans": 0, "invalid_polygons": 0, "outside": 0, "annotations": 0}
    ann_ids = set()
    for ann in data.get("annotations", []):
        _require(ann, ("id", "image_id", "bbox", "category_id"), "annotation", json_file)
        if ann["id"] in ann_ids:
            raise ValueError(f"{json_file}: duplicate annotation id {ann['id']}.")
        ann_ids.add(ann["id"])
        if isinstance(ann["category_id"], str):
            raise ValueError(
                f"{json_file}: annotation id {ann['id']} has category_id {ann['category_id']!r}, a "
                f"string; category ids are integers (write {ann['category_id']} without quotes)."
            )
        if ann["category_id"] in names and ann["category_id"] not in id_map:
            raise ValueError(
                f"{json_file}: annotation id {ann['id']} has category_id {ann['category_id']} "
                f"({names[ann['category_id']]!r}), a category left out of the classes "
                f"{cat_ids} (chosen by the training set and MODEL.DETR.NUM_CLASSES)."
            )
        iscrowd = ann.get("iscrowd", 0)
        if isinstance(iscrowd, str) or iscrowd not in (0, 1):
            kind = " (a string)" if isinstance(iscrowd, str) else ""
            raise ValueError(
                f"{json_file}: annotation id {ann['id']} has iscrowd {iscrowd!r}{kind}; "
                "expected 0 or 1."
            )
        if ann["category_id"] not in id_map:
            raise ValueError(
                f"{json_file}: annotation id {ann['id']} (image id {ann['image_id']}) has category_id "
                f"{ann['category_id']}, which is not in 'categories' (ids {all_ids[:10]}{'...' if len(all_ids) > 10 else ''})."
            )
        bbox = ann["bbox"]
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)
        ):
            raise ValueError(
                f"{json_file}: annotation id {ann['id']} has bbox {bbox!r}; expected [x, y, width, height]."
            )
        record = records.get(ann["image_id"])
        if record is None:
            counts["orphans"] += 1
            continue
        x, y, w, h = bbox
        if (
            record["width"]
            and record["height"]
            and (x < 0 or y < 0 or x + w > record["width"] or y + h > record["height"])
        ):
            counts["outside"] += 1
        obj = {
            "bbox": bbox,
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": id_map[ann["category_id"]],
            "iscrowd": int(iscrowd),
            "id": ann["id"],
        }
        segm = _segmentation(ann, json_file, counts)
        if segm is not None:
            obj["segmentation"] = segm
        record["annotations"].append(obj)
        counts["annotations"] += 1

    if counts["orphans"]:
        logger.warning(
            f"{json_file}: skipped {counts['orphans']} annotation(s) whose image_id is not in 'images'."
        )
    if counts["invalid_polygons"]:
        logger.warning(
            f"{json_file}: dropped {counts['invalid_polygons']} polygon(s) with fewer than 3 points."
        )
    if counts["outside"]:
        logger.warning(
            f"{json_file}: {counts['outside']} box(es) reach outside their image; they are clipped to it."
        )
    if counts["annotations"] == 0:
        logger.warning(
            f"{json_file}: the dataset {dataset_name!r} has no annotations at all (fine for negatives only)."
        )
    logger.info(
        f"Loaded {len(records)} images and {counts['annotations']} annotations from {json_file}"
    )

    MetadataCatalog.get(dataset_name).set(
        thing_classes=[names[i] for i in cat_ids],
        thing_dataset_id_to_contiguous_id=id_map,
    )
    return list(records.values())
