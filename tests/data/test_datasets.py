import json
import logging

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from detr_d2.data import drop_degenerate_boxes, register_datasets_from_cfg

from helpers import tiny_cfg


def write_coco(tmp_path):
    (tmp_path / "images").mkdir()
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "bbox": [1, 1, 3, 3],
                "area": 9,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 7, "name": "face"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(coco))
    return str(tmp_path / "train.json"), str(tmp_path / "images")


def test_register_from_cfg_and_reregister_is_noop(tmp_path):
    json_file, root = write_coco(tmp_path)
    cfg = tiny_cfg()
    cfg.DATASETS.REGISTER_COCO = [["test_reg_faces", json_file, root]]
    assert register_datasets_from_cfg(cfg) == ["test_reg_faces"]
    assert register_datasets_from_cfg(cfg) == []  # every launched process calls it
    records = DatasetCatalog.get("test_reg_faces")
    assert records[0]["annotations"][0]["category_id"] == 0
    assert MetadataCatalog.get("test_reg_faces").thing_classes == ["face"]
    cfg.DATASETS.REGISTER_COCO = [["test_reg_faces", json_file, str(tmp_path)]]
    with pytest.raises(ValueError, match="already registered"):
        register_datasets_from_cfg(cfg)


@pytest.mark.parametrize(
    "entry,error,message",
    [
        (
            ["x_missing_json", "{tmp}/nope.json", "{tmp}/images"],
            FileNotFoundError,
            r"DATASETS.REGISTER_COCO\[0\] \('x_missing_json'\): annotation file not found: .*nope.json",
        ),
        (
            ["x_missing_root", "{tmp}/train.json", "{tmp}/nope"],
            FileNotFoundError,
            r"image folder not found: .*nope",
        ),
        (
            ["only_two", "{tmp}/train.json"],
            ValueError,
            r"DATASETS.REGISTER_COCO\[0\] must be \[name, json_file, image_root\]",
        ),
    ],
)
def test_register_errors_name_key_and_path(tmp_path, entry, error, message):
    write_coco(tmp_path)
    cfg = tiny_cfg()
    cfg.DATASETS.REGISTER_COCO = [[x.format(tmp=tmp_path) for x in entry]]
    with pytest.raises(error, match=message):
        register_datasets_from_cfg(cfg)


def test_drop_degenerate_boxes_counts_and_keeps_images(caplog):
    def ann(bbox):
        return {"bbox": bbox, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}

    dicts = [
        {"image_id": 1, "annotations": [ann([0, 0, 5, 5]), ann([3, 3, 0, 4]), ann([1, 1, 4, -2])]},
        {"image_id": 2, "annotations": [ann([2, 2, 0, 0])]},
        {"image_id": 3, "annotations": []},
    ]
    with caplog.at_level(logging.WARNING, logger="detr_d2"):
        out = drop_degenerate_boxes(dicts, "toy")
    assert [len(d["annotations"]) for d in out] == [1, 0, 0] and len(out) == 3
    assert "Dropped 3 annotation(s) with zero or negative size from toy" in caplog.text
    assert "image 1 bbox [3, 3, 0, 4]" in caplog.text
