"""Tests of the synthetic sample face generator: determinism, valid COCO, sane boxes, skipping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from detr_tools.samples.faces import EMPTY_EVERY, generate_face_dataset
from PIL import Image
from pycocotools.coco import COCO

from helpers import files_under, load_tool

NUM_TRAIN, NUM_VAL, SEED = EMPTY_EVERY, 4, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset shared by the read-only tests (large enough for one negative image)."""
    out = tmp_path_factory.mktemp("faces")
    generate_face_dataset(out, NUM_TRAIN, NUM_VAL, SEED)
    return out


def test_layout_and_counts(dataset: Path) -> None:
    assert len(list((dataset / "train").glob("*.png"))) == NUM_TRAIN
    assert len(list((dataset / "val").glob("*.png"))) == NUM_VAL
    params = json.loads((dataset / "params.json").read_text())
    assert params["params"]["seed"] == SEED
    assert params["counts"]["train"]["images"] == NUM_TRAIN


def test_deterministic(dataset: Path, tmp_path: Path) -> None:
    generate_face_dataset(tmp_path, NUM_TRAIN, NUM_VAL, SEED)
    assert files_under(tmp_path) == files_under(dataset)


def test_seed_changes_images(dataset: Path, tmp_path: Path) -> None:
    generate_face_dataset(tmp_path, 2, 0, SEED + 1)
    assert (tmp_path / "train/000001.png").read_bytes() != (
        dataset / "train/000001.png"
    ).read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_json_valid(dataset: Path, split: str) -> None:
    coco = COCO(str(dataset / f"{split}.json"))
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "face", "supercategory": "person"}]
    assert sorted(coco.getImgIds()) == list(range(1, len(coco.getImgIds()) + 1))
    assert "synthetic" in coco.dataset["info"]["description"].lower()
    assert coco.dataset["info"]["seed"] == SEED
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(dataset / split / img["file_name"]) as im:
            assert im.mode == "RGB"
            assert im.size == (img["width"], img["height"])
        assert 144 <= img["width"] <= 224 and 144 <= img["height"] <= 224


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_and_polygons(dataset: Path, split: str) -> None:
    coco = COCO(str(dataset / f"{split}.json"))
    assert coco.getAnnIds(), "expected some faces"
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0
        assert x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
        assert ann["area"] == pytest.approx(w * h, abs=0.05)
        assert 12 <= h <= 100, "faces are about 20-90 px tall"
        (polygon,) = ann["segmentation"]
        points = np.asarray(polygon).reshape(-1, 2)
        assert len(points) >= 16
        assert points[:, 0].min() >= x - 1e-6 and points[:, 0].max() <= x + w + 1e-6
        assert points[:, 1].min() >= y - 1e-6 and points[:, 1].max() <= y + h + 1e-6
        # The box is the tight box of the polygon.
        assert points[:, 0].min() == pytest.approx(x) and points[:, 1].max() == pytest.approx(y + h)


def _iou(a: list[float], b: list[float]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_faces_do_not_overlap_much(dataset: Path) -> None:
    coco = COCO(str(dataset / "train.json"))
    for image_id in coco.getImgIds():
        boxes = [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))]
        assert len(boxes) <= 4
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert _iou(boxes[i], boxes[j]) < 0.1


def test_negative_images_exist(dataset: Path) -> None:
    coco = COCO(str(dataset / "train.json"))
    faces_per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert 0 in faces_per_image
    assert sum(n > 0 for n in faces_per_image) >= NUM_TRAIN - 2


def test_skip_if_up_to_date(tmp_path: Path) -> None:
    first = generate_face_dataset(tmp_path, 3, 1, 0)
    assert first["skipped"] is False
    marker = tmp_path / "train" / "000001.png"
    mtime = marker.stat().st_mtime_ns
    again = generate_face_dataset(tmp_path, 3, 1, 0)
    assert again["skipped"] is True
    assert again["train"] == first["train"] and again["val"] == first["val"]
    assert marker.stat().st_mtime_ns == mtime

    # Other parameters regenerate, and leave no stale image behind.
    other = generate_face_dataset(tmp_path, 2, 1, 0)
    assert other["skipped"] is False
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000001.png", "000002.png"]

    forced = generate_face_dataset(tmp_path, 2, 1, 0, force=True)
    assert forced["skipped"] is False

    # An interrupted run (no params file) is regenerated.
    (tmp_path / "params.json").unlink()
    assert generate_face_dataset(tmp_path, 2, 1, 0)["skipped"] is False


def test_rejects_negative_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image counts must be >= 0, got num_train=-1"):
        generate_face_dataset(tmp_path, -1, 1, 0)


def test_tool_entry_point(tmp_path: Path) -> None:
    tool = load_tool("make_sample_faces")
    out = tmp_path / "out"
    args = ["--out", str(out), "--num-train", "2", "--num-val", "1", "--seed", "5"]
    assert tool.main(args) == 0
    assert (out / "train.json").is_file() and (out / "val" / "000001.png").is_file()
    assert json.loads((out / "params.json").read_text())["params"]["seed"] == 5
