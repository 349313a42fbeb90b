"""Tests of the synthetic "people" generator: COCO categories, sane boxes, persons with face
heads, determinism, skipping, and loading with detectron2 and pycocotools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detr_tools.samples.faces import SKIN_TONES
from detr_tools.samples.people import (
    CATEGORIES,
    EMPTY_EVERY,
    PERSON,
    generate_people_dataset,
    render_image,
)
from PIL import Image
from pycocotools.coco import COCO

from detr_d2.data.coco_json import load_coco_detection_json

from helpers import files_under, load_tool

# Large enough for one negative image; small enough to stay well under a second.
NUM_TRAIN, NUM_VAL, SEED = EMPTY_EVERY, 4, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset shared by the read-only tests."""
    out = tmp_path_factory.mktemp("people")
    generate_people_dataset(out, NUM_TRAIN, NUM_VAL, SEED)
    return out


def test_categories_are_coco_ones() -> None:
    coco_names = {c["id"]: c["name"] for c in COCO_CATEGORIES if c["isthing"]}
    assert [c["id"] for c in CATEGORIES][0] == PERSON == 1
    assert len(CATEGORIES) >= 5
    for category in CATEGORIES:
        assert coco_names[category["id"]] == category["name"]
    assert "face" not in {c["name"] for c in CATEGORIES}


def test_layout_and_counts(dataset: Path) -> None:
    assert len(list((dataset / "train").glob("*.png"))) == NUM_TRAIN
    assert len(list((dataset / "val").glob("*.png"))) == NUM_VAL
    counts = json.loads((dataset / "params.json").read_text())["counts"]["train"]
    assert counts["images"] == NUM_TRAIN
    assert counts["instances"] == sum(counts[c["name"]] for c in CATEGORIES)
    assert counts["empty_images"] >= 1


def test_deterministic(dataset: Path, tmp_path: Path) -> None:
    generate_people_dataset(tmp_path, NUM_TRAIN, NUM_VAL, SEED)
    assert files_under(tmp_path) == files_under(dataset)


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_json_valid(dataset: Path, split: str) -> None:
    coco = COCO(str(dataset / f"{split}.json"))
    assert coco.loadCats(coco.getCatIds()) == CATEGORIES
    assert coco.dataset["info"]["seed"] == SEED
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(dataset / split / img["file_name"]) as im:
            assert im.mode == "RGB"
            assert im.size == (img["width"], img["height"])
        assert 144 <= img["width"] <= 224 and 144 <= img["height"] <= 224
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(ann).any(), f"annotation {ann['id']} has an empty mask"


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_inside_images(dataset: Path, split: str) -> None:
    coco = COCO(str(dataset / f"{split}.json"))
    assert coco.getAnnIds(), "expected some objects"
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and ann["category_id"] in coco.cats
        assert w >= 4 and h >= 4
        assert x >= 0 and y >= 0
        assert x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
        assert ann["area"] == pytest.approx(w * h, abs=0.05)
        # The box is the tight box of the segmentation's parts.
        points = np.concatenate([np.reshape(p, (-1, 2)) for p in ann["segmentation"]])
        assert points[:, 0].min() == pytest.approx(x) and points[:, 1].min() == pytest.approx(y)
        assert points[:, 0].max() == pytest.approx(x + w, abs=0.02)
        assert points[:, 1].max() == pytest.approx(y + h, abs=0.02)
    for image_id in coco.getImgIds():
        assert len(coco.getAnnIds(imgIds=[image_id])) <= 5


def test_persons_are_standing_figures(dataset: Path) -> None:
    coco = COCO(str(dataset / "train.json"))
    persons = coco.loadAnns(coco.getAnnIds(catIds=[PERSON]))
    for category in CATEGORIES[1:]:
        assert len(persons) > len(coco.getAnnIds(catIds=[category["id"]])), "person most frequent"
    ratios = [a["bbox"][3] / a["bbox"][2] for a in persons]
    assert np.mean(ratios) > 1.2, "a standing figure's box is taller than wide"


def _skin_fraction(pixels: np.ndarray) -> float:
    """Fraction of pixels [N, 3] close to one of the face sample's skin tones."""
    tones = np.asarray(SKIN_TONES, dtype=np.float64)
    distance = np.linalg.norm(pixels[:, None, :].astype(np.float64) - tones[None], axis=2)
    return float((distance.min(axis=1) < 30.0).mean())


def test_person_heads_are_faces_at_the_top() -> None:
    num_persons = 0
    for index in range(12):
        image, objects = render_image(np.random.default_rng([SEED, index]), empty=False)
        pixels = np.asarray(image)
        for obj in objects:
            if obj.category_id != PERSON:
                assert obj.head_box is None
                continue
            num_persons += 1
            x0, y0, x1, y1 = obj.box
            hx0, hy0, hx1, hy1 = obj.head_box
            assert x0 - 1e-6 <= hx0 < hx1 <= x1 + 1e-6 and y0 - 1e-6 <= hy0 < hy1 <= y1 + 1e-6
            # The head is at the top (a raised hand may reach above it).
            assert (hy0 + hy1) / 2 < y0 + 0.45 * (y1 - y0)
            head = pixels[int(hy0) : int(np.ceil(hy1)), int(hx0) : int(np.ceil(hx1))]
            assert _skin_fraction(head.reshape(-1, 3)) > 0.2, "the head is a skin-coloured face"
    assert num_persons >= 8


def test_loads_with_detectron2(dataset: Path) -> None:
    name = "test_sample_people_train"
    try:
        records = load_coco_json(str(dataset / "train.json"), str(dataset / "train"), name)
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == [c["name"] for c in CATEGORIES]
        assert meta.thing_dataset_id_to_contiguous_id[PERSON] == 0
    finally:
        MetadataCatalog.remove(name)
    assert len(records) == NUM_TRAIN
    assert Path(records[0]["file_name"]).is_file()
    instances = [a for r in records for a in r["annotations"]]
    assert len(instances) == len(json.loads((dataset / "train.json").read_text())["annotations"])
    assert all(a["segmentation"] for a in instances)

    name = "test_sample_people_val"
    try:
        ours = load_coco_detection_json(str(dataset / "val.json"), str(dataset / "val"), name)
    finally:
        MetadataCatalog.remove(name)
    assert len(ours) == NUM_VAL


def test_skip_if_up_to_date(tmp_path: Path) -> None:
    first = generate_people_dataset(tmp_path, 3, 1, 0)
    assert first["skipped"] is False
    marker = tmp_path / "train" / "000001.png"
    mtime = marker.stat().st_mtime_ns
    again = generate_people_dataset(tmp_path, 3, 1, 0)
    assert again["skipped"] is True
    assert again["train"] == first["train"] and again["val"] == first["val"]
    assert marker.stat().st_mtime_ns == mtime

    # Other parameters regenerate, and leave no stale image behind.
    assert generate_people_dataset(tmp_path, 2, 1, 0)["skipped"] is False
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000001.png", "000002.png"]
    assert generate_people_dataset(tmp_path, 2, 1, 0, force=True)["skipped"] is False


def test_tool_entry_point(tmp_path: Path) -> None:
    tool = load_tool("make_sample_people")
    out = tmp_path / "out"
    args = ["--out", str(out), "--num-train", "2", "--num-val", "1", "--seed", "5"]
    assert tool.main(args) == 0
    assert (out / "train.json").is_file() and (out / "val" / "000001.png").is_file()
    assert json.loads((out / "params.json").read_text())["params"]["seed"] == 5
