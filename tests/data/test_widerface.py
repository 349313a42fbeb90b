"""Tests of the WIDER FACE gt parser and its COCO conversion, on a hand-written gt file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from detr_d2.data.widerface import parse_widerface_gt, widerface_to_coco

from helpers import load_tool

# Same layout as wider_face_train_bbx_gt.txt. Image sizes are set up in the `wider` fixture.
GT = """\
0--Parade/0_Parade_marchingband_1_849.jpg
1
449 330 122 149 0 0 0 0 0 0
0--Parade/0_Parade_Parade_0_904.jpg
0
0 0 0 0 0 0 0 0 0 0
1--Handshaking/1_Handshaking_1_12.jpg
5
10 12 30 40 2 1 0 0 1 2
50 60 20 25 0 0 0 1 0 0
70 5 0 18 1 0 0 0 0 0
-4 90 30 30 0 0 1 0 2 0
590 10 40 40 0 1 0 0 0 1
"""
SIZES = {
    "0--Parade/0_Parade_marchingband_1_849.jpg": (1024, 682),
    "0--Parade/0_Parade_Parade_0_904.jpg": (64, 48),
    "1--Handshaking/1_Handshaking_1_12.jpg": (600, 100),
}


@pytest.fixture()
def wider(tmp_path: Path) -> tuple[Path, Path]:
    """(gt file, image root) with tiny images of the sizes above."""
    gt = tmp_path / "wider_face_train_bbx_gt.txt"
    gt.write_text(GT)
    root = tmp_path / "WIDER_train" / "images"
    for name, size in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 150)).save(root / name, format="JPEG")
    return gt, root


def test_parse(wider: tuple[Path, Path]) -> None:
    blocks = parse_widerface_gt(wider[0])
    assert [b["file_name"] for b in blocks] == list(SIZES)
    assert [len(b["faces"]) for b in blocks] == [1, 0, 5]
    assert [b["line"] for b in blocks] == [1, 4, 7]
    face = blocks[0]["faces"][0]
    assert (face["x1"], face["y1"], face["w"], face["h"]) == (449, 330, 122, 149)
    assert face["line"] == 3
    assert blocks[2]["faces"][1]["invalid"] == 1
    assert blocks[2]["faces"][0]["pose"] == 2 and blocks[2]["faces"][0]["blur"] == 2


def test_zero_face_block_without_placeholder(tmp_path: Path) -> None:
    gt = tmp_path / "gt.txt"
    gt.write_text("a/x.jpg\n0\nb/y.jpg\n1\n1 2 3 4 0 0 0 0 0 0\n")
    blocks = parse_widerface_gt(gt)
    assert [(b["file_name"], len(b["faces"])) for b in blocks] == [("a/x.jpg", 0), ("b/y.jpg", 1)]


def test_convert(wider: tuple[Path, Path], tmp_path: Path) -> None:
    coco_dict, stats = widerface_to_coco(*wider)
    assert stats == {
        "images": 3,
        "images_skipped_missing": 0,
        "images_without_faces": 1,
        "faces": 4,
        "faces_dropped_invalid": 1,
        "faces_dropped_nonpositive_size": 1,
        "faces_dropped_outside_image": 0,
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco_dict))
    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["face"]
    images = {img["file_name"]: img for img in coco.loadImgs(coco.getImgIds())}
    for name, (width, height) in SIZES.items():
        assert (images[name]["width"], images[name]["height"]) == (width, height)
    negative = images["0--Parade/0_Parade_Parade_0_904.jpg"]["id"]
    assert coco.getAnnIds(imgIds=[negative]) == []
    crowd = images["1--Handshaking/1_Handshaking_1_12.jpg"]["id"]
    boxes = [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[crowd]))]
    # Kept: the first face, the face clipped on the left, the face clipped on the right.
    assert boxes == [[10.0, 12.0, 30.0, 40.0], [0.0, 90.0, 26.0, 10.0], [590.0, 10.0, 10.0, 40.0]]
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        img = coco.imgs[ann["image_id"]]
        assert w > 0 and h > 0 and x + w <= img["width"] and y + h <= img["height"]
        assert ann["area"] == pytest.approx(w * h)
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0
        assert set(ann["attributes"]) == {
            "blur",
            "expression",
            "illumination",
            "invalid",
            "occlusion",
            "pose",
        }
    first = coco.loadAnns(coco.getAnnIds(imgIds=[crowd]))[0]
    assert first["attributes"]["blur"] == 2 and first["attributes"]["pose"] == 2


def test_face_outside_image_dropped(tmp_path: Path) -> None:
    gt = tmp_path / "gt.txt"
    gt.write_text("a.jpg\n1\n100 100 10 10 0 0 0 0 0 0\n")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.jpg")
    coco, stats = widerface_to_coco(gt, tmp_path)
    assert coco["annotations"] == [] and stats["faces_dropped_outside_image"] == 1


def test_missing_image(wider: tuple[Path, Path]) -> None:
    gt, root = wider
    (root / "0--Parade/0_Parade_Parade_0_904.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="0_Parade_Parade_0_904.jpg"):
        widerface_to_coco(gt, root)
    coco, stats = widerface_to_coco(gt, root, skip_missing=True)
    assert stats["images_skipped_missing"] == 1 and stats["images"] == 2
    assert [img["id"] for img in coco["images"]] == [1, 2]
    assert {a["image_id"] for a in coco["annotations"]} == {1, 2}


def test_unreadable_image(wider: tuple[Path, Path]) -> None:
    gt, root = wider
    (root / "0--Parade/0_Parade_Parade_0_904.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match="0_Parade_Parade_0_904.jpg"):
        widerface_to_coco(gt, root)
    assert widerface_to_coco(gt, root, skip_missing=True)[1]["images_skipped_missing"] == 1


@pytest.mark.parametrize(
    "text, line",
    [
        # Truncated block: 2 faces announced, 1 given.
        ("a.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n", 4),
        # Non-integer field.
        ("a.jpg\n1\n1 2 3 x 0 0 0 0 0 0\n", 3),
        # Wrong number of fields.
        ("a.jpg\n1\n1 2 3 4 0 0 0 0 0\n", 3),
        # Non-integer face count.
        ("a.jpg\n1\n1 2 3 4 0 0 0 0 0 0\nb.jpg\none\n", 5),
        # Count missing at the end of the file.
        ("a.jpg\n", 2),
        # More face lines than announced: a face line where an image path belongs.
        ("a.jpg\n1\n1 2 3 4 0 0 0 0 0 0\n5 6 7 8 0 0 0 0 0 0\n", 4),
        # Malformed placeholder line after a count of 0.
        ("a.jpg\n0\n0 0 0\n", 3),
    ],
)
def test_malformed(tmp_path: Path, text: str, line: int) -> None:
    gt = tmp_path / "bad_gt.txt"
    gt.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{gt}:{line}:")):
        parse_widerface_gt(gt)


def test_tool_entry_point(wider: tuple[Path, Path], tmp_path: Path) -> None:
    tool = load_tool("widerface_to_coco")
    out = tmp_path / "out" / "train.json"
    assert tool.main(["--gt", str(wider[0]), "--images", str(wider[1]), "--out", str(out)]) == 0
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == 4
