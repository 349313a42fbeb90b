"""WIDER FACE ground truth (``wider_face_*_bbx_gt.txt``) to COCO json.

Why: Detectron2 reads COCO json, and WIDER FACE ships its boxes in its own text format: blocks of
an image path (relative to ``WIDER_*/images``), the face count n, then n lines
``x1 y1 w h blur expression illumination invalid occlusion pose``. When n is 0 the block still
holds one line of zeros, which is consumed and is not a face.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

__all__ = ["ATTRIBUTE_NAMES", "parse_widerface_gt", "widerface_to_coco"]

logger = logging.getLogger(__name__)

# The ten integers of a face line, in file order.
FIELD_NAMES = (
    "x1",
    "y1",
    "w",
    "h",
    "blur",
    "expression",
    "illumination",
    "invalid",
    "occlusion",
    "pose",
)
ATTRIBUTE_NAMES = FIELD_NAMES[4:]
CATEGORIES = [{"id": 1, "name": "face", "supercategory": "person"}]

PathLike = str | os.PathLike


class _Lines:
    """Non-blank lines of the gt file with their 1-based line numbers, for precise errors."""

    def __init__(self, path: PathLike) -> None:
        self.path = str(path)
        with open(path) as f:
            self._lines = [
                (number, line.strip()) for number, line in enumerate(f, start=1) if line.strip()
            ]
        self._pos = 0
        self.last_number = 0

    def __bool__(self) -> bool:
        return self._pos < len(self._lines)

    def peek(self) -> tuple[int, str] | None:
        """The next line without consuming it (None at the end)."""
        return self._lines[self._pos] if self else None

    def next(self, what: str) -> tuple[int, str]:
        """Consume the next line; a missing one means the last block is truncated."""
        if not self:
            raise self.error(self.last_number + 1, f"unexpected end of file, expected {what}")
        number, text = self._lines[self._pos]
        self._pos += 1
        self.last_number = number
        return number, text

    def error(self, number: int, message: str) -> ValueError:
        """A ValueError naming the gt file and the line."""
        return ValueError(f"{self.path}:{number}: {message}")


def _ints(text: str) -> list[int] | None:
    """The whitespace-separated integers of a line, or None if any field is not an integer."""
    try:
        return [int(token) for token in text.split()]
    except ValueError:
        return None


def _face_fields(lines: _Lines, number: int, text: str) -> dict[str, int]:
    """Parse one face line into its ten named integer fields."""
    values = _ints(text)
    if values is None:
        raise lines.error(number, f"face line has a non-integer field: {text!r}")
    if len(values) != len(FIELD_NAMES):
        raise lines.error(
            number, f"face line has {len(values)} fields, expected {len(FIELD_NAMES)}: {text!r}"
        )
    return dict(zip(FIELD_NAMES, values))


def _iter_blocks(lines: _Lines) -> Iterator[dict[str, Any]]:
    """Yield one dict per image block (see :func:`parse_widerface_gt`)."""
    while lines:
        number, file_name = lines.next("an image path")
        if _ints(file_name) is not None:
            raise lines.error(number, f"expected an image path, got {file_name!r}")
        count_number, count_text = lines.next(f"the number of faces of {file_name}")
        count = _ints(count_text)
        if count is None or len(count) != 1 or count[0] < 0:
            raise lines.error(
                count_number, f"expected the number of faces of {file_name}, got {count_text!r}"
            )
        faces = []
        for _ in range(count[0]):
            face_number, face_text = lines.next(f"a face line of {file_name}")
            faces.append({**_face_fields(lines, face_number, face_text), "line": face_number})
        if count[0] == 0:
            # WIDER writes one all-zero placeholder line after a count of 0: consume it. Files
            # rewritten without it (the next line is already an image path) are accepted too.
            following = lines.peek()
            if following is not None and _ints(following[1]) is not None:
                _face_fields(lines, *lines.next("the placeholder line"))
        yield {"file_name": file_name, "line": number, "faces": faces}


def parse_widerface_gt(path: PathLike) -> list[dict[str, Any]]:
    """Parse a WIDER FACE gt file into ``[{"file_name", "line", "faces": [...]}, ...]``.

    Each face is a dict of the ten integer fields (``x1 y1 w h blur expression illumination
    invalid occlusion pose``) plus its ``line`` number. Raises ``ValueError`` naming the file and
    the line for a truncated block, a non-integer field or a wrong number of fields.
    """
    return list(_iter_blocks(_Lines(path)))


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header only; errors name the file."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as e:
        raise FileNotFoundError(f"WIDER FACE image not found: {path}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise OSError(f"cannot read WIDER FACE image {path}: {e}") from e


def widerface_to_coco(
    gt_path: PathLike, image_root: PathLike, skip_missing: bool = False
) -> tuple[dict[str, Any], dict[str, int]]:
    """Convert a WIDER FACE gt file to a COCO dict (one category, ``face``) and counts.

    Image sizes come from the files under ``image_root``; a missing or unreadable image raises
    (naming it) unless ``skip_missing``, which drops it and counts it. Faces marked invalid or with
    w <= 0 or h <= 0 are dropped and counted; boxes are clipped to the image (a box left empty by
    clipping is dropped too); images without faces are kept as negatives. The WIDER attributes
    go to each annotation's ``attributes`` dict.
    """
    blocks = parse_widerface_gt(gt_path)
    image_root = Path(image_root)
    stats = {
        "images": 0,
        "images_skipped_missing": 0,
        "images_without_faces": 0,
        "faces": 0,
        "faces_dropped_invalid": 0,
        "faces_dropped_nonpositive_size": 0,
        "faces_dropped_outside_image": 0,
    }
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for block in blocks:
        try:
            width, height = _image_size(image_root / block["file_name"])
        except OSError:
            if not skip_missing:
                raise
            stats["images_skipped_missing"] += 1
            logger.debug("Skipping missing or unreadable image %s", block["file_name"])
            continue
        image_id = len(images) + 1
        images.append(
            {"id": image_id, "file_name": block["file_name"], "height": height, "width": width}
        )
        kept = 0
        for face in block["faces"]:
            if face["invalid"]:
                stats["faces_dropped_invalid"] += 1
                continue
            if face["w"] <= 0 or face["h"] <= 0:
                stats["faces_dropped_nonpositive_size"] += 1
                continue
            x0, y0 = max(0.0, float(face["x1"])), max(0.0, float(face["y1"]))
            x1 = min(float(width), float(face["x1"] + face["w"]))
            y1 = min(float(height), float(face["y1"] + face["h"]))
            if x1 <= x0 or y1 <= y0:
                stats["faces_dropped_outside_image"] += 1
                continue
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "attributes": {name: face[name] for name in ATTRIBUTE_NAMES},
                }
            )
            kept += 1
        stats["images_without_faces"] += kept == 0
    stats["images"] = len(images)
    stats["faces"] = len(annotations)
    coco = {
        "info": {
            "description": "WIDER FACE converted to COCO by tools/widerface_to_coco.py",
            "source": os.path.basename(str(gt_path)),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    return coco, stats
