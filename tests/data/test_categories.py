"""Dataset categories against NUM_CLASSES: the Roboflow-style unused superclass, NUM_CLASSES 0,
a count that fits nothing, and the bad-data messages that used to leave users guessing."""

import json
import logging

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage
from detr_tools.samples.faces import generate_face_dataset

from detr_d2.data import register_datasets_from_cfg
from detr_d2.data.coco_json import load_coco_detection_json
from detr_d2.engine import DetrTrainer
from detr_d2.layout import layout_from_cfg

from helpers import CONFIGS, build_model_no_weights, coco_dataset_opts, make_cfg

INSTANT = CONFIGS / "quick_schedules" / "detr_face_sample_instant_test.yaml"
SUPERCLASS = [
    {"id": 0, "name": "faces", "supercategory": "none"},
    {"id": 1, "name": "face", "supercategory": "faces"},
]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("superclass_faces")
    generate_face_dataset(str(root), num_train=4, num_val=2, seed=5)
    for split in ("train", "val"):  # as a Roboflow export: unused category 0 beside "face" (1)
        data = json.loads((root / f"{split}.json").read_text())
        data["categories"] = SUPERCLASS
        (root / f"{split}.json").write_text(json.dumps(data))
    return root


def _cfg(root, prefix, num_classes, train_json="train.json"):
    opts = coco_dataset_opts(
        prefix, root / train_json, root / "train", root / "val.json", root / "val"
    )
    cfg = make_cfg(
        INSTANT, opts + ["MODEL.DETR.NUM_CLASSES", num_classes, "DATALOADER.NUM_WORKERS", 0]
    )
    register_datasets_from_cfg(cfg)
    return cfg


@pytest.mark.parametrize("num_classes", [1, 0])
def test_superclass_dataset_trains_with_the_right_labels(faces, caplog, num_classes):
    """NUM_CLASSES 1 (or 0, "from the dataset"): the unused superclass is dropped with a log
    line, "face" is class 0, and every training label reaching the losses is 0."""
    with caplog.at_level(logging.INFO, logger="detr_d2"):
        cfg = _cfg(faces, f"superclass{num_classes}", num_classes)
    assert "dropped 1 category(ies) that no annotation uses: 0 'faces'" in caplog.text
    if num_classes == 0:
        assert "MODEL.DETR.NUM_CLASSES 0: 1 class(es) from the training set" in caplog.text
    layout = layout_from_cfg(cfg)
    assert layout.names == ("face",) and layout.dataset_ids == (1,)
    labels = {
        a["category_id"]
        for r in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
        for a in r["annotations"]
    }
    assert labels == {0}
    model = build_model_no_weights(cfg)
    assert model.num_classes == 1 and model.criterion.num_classes == 1
    batch = next(iter(DetrTrainer.build_train_loader(cfg)))
    assert all(set(x["instances"].gt_classes.tolist()) <= {0} for x in batch)
    with EventStorage():
        losses = model.train()(batch)
    assert all(torch.isfinite(v) for v in losses.values())


def test_count_that_fits_nothing_stops_at_start(faces):
    """Both categories used (one annotation of the superclass) and NUM_CLASSES 1: say so."""
    data = json.loads((faces / "train.json").read_text())
    data["annotations"][0]["category_id"] = 0
    (faces / "train_both.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        _cfg(faces, "superclass_both", 1, train_json="train_both.json")
    message = str(error.value)
    assert "MODEL.DETR.NUM_CLASSES=1 does not fit the dataset 'superclass_both_train'" in message
    assert (
        "2 categories (0 'faces', 1 'face')" in message
        and "Set MODEL.DETR.NUM_CLASSES 2" in message
    )


def test_trainer_refuses_labels_outside_the_classes(faces):
    """Labels >= NUM_CLASSES never reach the losses, whatever registered the dataset."""
    cfg = _cfg(faces, "superclass_guard", 1)
    DatasetCatalog.register(
        "guard_all_categories",
        lambda: load_coco_detection_json(
            str(faces / "train.json"), str(faces / "train"), "guard_all_categories"
        ),
    )
    cfg.DATASETS.TRAIN = ("guard_all_categories",)  # both categories: "face" is label 1
    with pytest.raises(ValueError, match=r"class 1, but MODEL.DETR.NUM_CLASSES=1"):
        DetrTrainer.build_train_loader(cfg)


def _coco(tmp_path, image=None, annotation=None):
    data = {
        "images": [
            dict({"id": 1, "file_name": "a.png", "height": 20, "width": 30}, **(image or {}))
        ],
        "annotations": [
            dict(
                {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                **(annotation or {}),
            )
        ],
        "categories": [{"id": 1, "name": "face"}],
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "image,annotation,message",
    [
        (
            {"height": "20"},
            None,
            r"bad.json: image id 1 has 'height' is '20', a string; expected a number",
        ),
        (
            None,
            {"iscrowd": "no"},
            r"bad.json: annotation id 7 has iscrowd 'no' \(a string\); expected 0 or 1",
        ),
        (
            None,
            {"category_id": "1"},
            r"annotation id 7 has category_id '1', a string; category ids are integers",
        ),
    ],
)
def test_values_given_as_strings_are_named(tmp_path, image, annotation, message):
    with pytest.raises(ValueError, match=message):
        load_coco_detection_json(_coco(tmp_path, image, annotation), str(tmp_path), "strings")
