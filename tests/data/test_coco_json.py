"""Bad COCO-format data gets an error naming the file and the id, or a counted skip."""

import json
import logging

import pytest
from detectron2.data import MetadataCatalog

from detr_d2.data.coco_json import load_coco_detection_json


def coco(**changes):
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "b.png", "height": 20, "width": 30},
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 5,
                "bbox": [1, 2, 3, 4],
                "iscrowd": 0,
                "segmentation": [[1, 2, 4, 2, 4, 6]],
            },
            {"id": 11, "image_id": 2, "category_id": 9, "bbox": [0, 0, 10, 10]},
        ],
        "categories": [{"id": 9, "name": "cat"}, {"id": 5, "name": "face"}],
    }
    data.update(changes)
    return data


def write(tmp_path, data, name="d.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_valid_file_gives_dicts_and_metadata(tmp_path):
    records = load_coco_detection_json(write(tmp_path, coco()), "/imgs", "cj_valid")
    assert [r["file_name"] for r in records] == ["/imgs/a.png", "/imgs/b.png"]
    assert records[0]["annotations"][0]["category_id"] == 0  # id 5 -> contiguous 0 (sorted ids)
    assert records[1]["annotations"][0]["category_id"] == 1
    meta = MetadataCatalog.get("cj_valid")
    assert meta.thing_classes == ["face", "cat"] and meta.thing_dataset_id_to_contiguous_id == {
        5: 0,
        9: 1,
    }


@pytest.mark.parametrize(
    "data,message",
    [
        ('{"images": [', r"d.json: not valid JSON \(.* line 1"),
        ({"annotations": []}, r"d.json: missing or invalid 'images' list"),
        (coco(images=[]), r"has no images"),
        (coco(images=[{"id": 1}]), r"image id 1 has no 'file_name' field"),
        (
            coco(annotations=[{"id": 7, "image_id": 1, "category_id": 5}]),
            r"annotation id 7 has no 'bbox' field",
        ),
        (
            coco(annotations=[{"id": 7, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}]),
            r"annotation id 7 \(image id 1\) has category_id 3, which is not in 'categories'",
        ),
        (
            coco(annotations=[{"id": 7, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1]}]),
            r"annotation id 7 has bbox \[0, 0, 1\]",
        ),
        (
            coco(
                annotations=[{"id": 7, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}] * 2
            ),
            r"duplicate annotation id 7",
        ),
        (
            coco(images=[{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}]),
            r"duplicate image id 1",
        ),
    ],
)
def test_errors_name_file_and_id(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        load_coco_detection_json(write(tmp_path, data), "/imgs", "cj_bad")


def test_unreadable_file_named(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="binary.json"):
        load_coco_detection_json(str(path), "/imgs", "cj_binary")


def test_counted_skips_and_warnings(tmp_path, caplog):
    data = coco()
    data["annotations"] += [
        {"id": 12, "image_id": 99, "category_id": 5, "bbox": [0, 0, 1, 1]},  # no such image
        {
            "id": 13,
            "image_id": 1,
            "category_id": 5,
            "bbox": [25, 15, 10, 10],
            "segmentation": [[1, 2, 3, 4]],
        },  # outside, bad polygon
    ]
    with caplog.at_level(logging.INFO, logger="detr_d2"):
        records = load_coco_detection_json(write(tmp_path, data), "/imgs", "cj_counts")
    assert sum(len(r["annotations"]) for r in records) == 3
    assert "skipped 1 annotation(s) whose image_id is not in 'images'" in caplog.text
    assert "dropped 1 polygon(s) with fewer than 3 points" in caplog.text
    assert "1 box(es) reach outside their image" in caplog.text
    assert "segmentation" not in records[0]["annotations"][1]


def test_no_annotations_is_valid_but_warned(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="detr_d2"):
        records = load_coco_detection_json(
            write(tmp_path, coco(annotations=[])), "/imgs", "cj_negatives"
        )
    assert len(records) == 2 and all(r["annotations"] == [] for r in records)
    assert "has no annotations at all" in caplog.text
