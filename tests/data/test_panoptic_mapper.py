"""Panoptic data: the sample generator, registration from the config, targets from panoptic PNGs
(and instance masks from polygons/RLE) through DetrDatasetMapper, and the class layouts."""

import copy
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog, transforms as T
from detectron2.structures import BoxMode
from detr_tools.samples.panoptic import CATEGORIES, generate_panoptic_dataset
from PIL import Image

from detr_d2.data import (
    DetrDatasetMapper,
    coco_class_rows,
    register_datasets_from_cfg,
    thing_ids_from_cfg,
)
from detr_d2.data.panoptic import rgb2id

from helpers import tiny_cfg


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic")
    generate_panoptic_dataset(root, num_train=6, num_val=2, seed=5)
    return root


def register_row(root, split, name):
    return [
        name,
        f"{root}/{split}",
        f"{root}/panoptic_{split}",
        f"{root}/panoptic_{split}.json",
        f"{root}/instances_{split}.json",
    ]


@pytest.fixture(scope="module")
def registered(sample):
    cfg = tiny_cfg(NUM_CLASSES=5)
    cfg.DATASETS.REGISTER_COCO_PANOPTIC = [register_row(sample, "train", "pan_mapper_train")]
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ("pan_mapper_train",)
    register_datasets_from_cfg(cfg)
    return cfg, DatasetCatalog.get("pan_mapper_train")


def test_generator_is_deterministic_and_consistent(sample, tmp_path):
    again = tmp_path / "again"
    generate_panoptic_dataset(again, num_train=6, num_val=2, seed=5)
    for name in [
        "panoptic_train.json",
        "instances_val.json",
        "train/000003.png",
        "panoptic_train/000003.png",
    ]:
        assert (again / name).read_bytes() == (sample / name).read_bytes(), name
    assert generate_panoptic_dataset(again, num_train=6, num_val=2, seed=5)["skipped"]
    panoptic = json.loads((sample / "panoptic_train.json").read_text())
    instances = json.loads((sample / "instances_train.json").read_text())
    things = {c["id"] for c in CATEGORIES if c["isthing"]}
    for ann in panoptic["annotations"]:
        ids = rgb2id(
            np.asarray(Image.open(sample / "panoptic_train" / ann["file_name"]).convert("RGB"))
        )
        assert set(np.unique(ids)) == {
            s["id"] for s in ann["segments_info"]
        }  # every pixel labelled
        for segment in ann["segments_info"]:
            assert (ids == segment["id"]).sum() == segment["area"]
    assert len(instances["annotations"]) == sum(
        s["category_id"] in things for a in panoptic["annotations"] for s in a["segments_info"]
    )
    first = instances["annotations"][0]
    assert mask_util.decode(first["segmentation"]).sum() == first["area"]


def test_registration_metadata_puts_things_first(registered):
    cfg, records = registered
    meta = MetadataCatalog.get("pan_mapper_train")
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.json_file.endswith(
        "instances_train.json"
    )
    assert meta.thing_classes == ["face", "ball"] and meta.stuff_classes == [
        "face",
        "ball",
        "sky",
        "wall",
        "ground",
    ]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}
    assert meta.stuff_dataset_id_to_contiguous_id == {3: 2, 4: 3, 5: 4}
    assert thing_ids_from_cfg(cfg) == [0, 1]
    assert records[0]["file_name"].endswith("train/000001.png") and records[0]["height"] > 0
    assert all(s["isthing"] == (s["category_id"] < 2) for r in records for s in r["segments_info"])
    register_datasets_from_cfg(cfg)  # the same files again: a no-op


@pytest.mark.parametrize(
    "row,message",
    [
        (["pan_bad", "nowhere"], "must be [name, image_root, panoptic_root, panoptic_json]"),
        (
            ["pan_missing", "{root}/train", "{root}/panoptic_train", "{root}/missing.json"],
            "panoptic json not found: {root}/missing.json",
        ),
        (
            ["pan_missing", "{root}/train", "{root}/nope", "{root}/panoptic_train.json"],
            "panoptic PNG folder not found: {root}/nope",
        ),
    ],
)
def test_registration_errors_name_the_key_and_path(sample, row, message):
    cfg = tiny_cfg()
    cfg.DATASETS.REGISTER_COCO_PANOPTIC = [[x.format(root=sample) for x in row]]
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        register_datasets_from_cfg(cfg)
    assert "DATASETS.REGISTER_COCO_PANOPTIC[0]" in str(error.value) and message.format(
        root=sample
    ) in str(error.value)


def mapper(cfg, augmentations, mask_on=True):
    return DetrDatasetMapper(
        is_train=True, augmentations=augmentations, image_format="RGB", mask_on=mask_on
    )


def test_panoptic_targets_follow_the_png(registered):
    cfg, records = registered
    record = copy.deepcopy(records[0])
    record["segments_info"][0]["iscrowd"] = 1  # crowd segments are not targets
    ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
    height, width = ids.shape
    out = mapper(
        cfg, [T.ResizeTransform(height, width, 2 * height, 2 * width), T.HFlipTransform(2 * width)]
    )(record)
    instances = out["instances"]
    segments = record["segments_info"][1:]
    assert instances.gt_classes.tolist() == [s["category_id"] for s in segments]
    assert instances.gt_masks.tensor.shape == (len(segments), 2 * height, 2 * width)
    for segment, mask, box in zip(segments, instances.gt_masks.tensor, instances.gt_boxes.tensor):
        expected = np.repeat(np.repeat(ids == segment["id"], 2, 0), 2, 1)[:, ::-1]
        assert np.array_equal(mask.numpy(), expected)
        rows, cols = np.nonzero(expected.any(1))[0], np.nonzero(expected.any(0))[0]
        assert box.tolist() == [
            cols[0],
            rows[0],
            cols[-1] + 1,
            rows[-1] + 1,
        ]  # tight box of the mask
    assert "pan_seg_file_name" not in out and "segments_info" not in out


def test_panoptic_crop_drops_vanished_segments_and_masks_are_optional(registered):
    cfg, records = registered
    record = copy.deepcopy(records[1])
    ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
    crop = T.CropTransform(0, 0, 12, 12)
    present = set(np.unique(ids[:12, :12]))
    out = mapper(cfg, [crop], mask_on=False)(record)
    assert not out["instances"].has("gt_masks")
    expected = [s["category_id"] for s in record["segments_info"] if s["id"] in present]
    assert out["instances"].gt_classes.tolist() == expected
    assert (out["instances"].gt_boxes.tensor[:, 2:] <= 12).all()


@pytest.mark.parametrize("kind", ["polygon", "rle", "uncompressed_rle"])
def test_instance_masks_from_coco_segmentations(registered, kind):
    cfg, records = registered
    height, width = records[0]["height"], records[0]["width"]
    square = np.zeros((height, width), dtype=np.uint8)
    square[10:30, 20:50] = 1
    if kind == "polygon":
        segmentation = [[20, 10, 50, 10, 50, 30, 20, 30]]
    else:
        segmentation = mask_util.encode(np.asfortranarray(square))
        if kind == "uncompressed_rle":
            runs = np.diff(
                np.concatenate(
                    [[0], np.flatnonzero(np.diff(square.T.reshape(-1))) + 1, [square.size]]
                )
            )
            segmentation = {"size": [height, width], "counts": runs.tolist()}
    record = {
        "file_name": records[0]["file_name"],
        "height": height,
        "width": width,
        "image_id": 1,
        "annotations": [
            {
                "bbox": [20, 10, 30, 20],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 1,
                "segmentation": segmentation,
                "iscrowd": 0,
            },
            {
                "bbox": [0, 0, 5, 5],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 0,
                "segmentation": segmentation,
                "iscrowd": 1,
            },
        ],
    }
    out = mapper(cfg, [T.HFlipTransform(width)])(record)
    masks = out["instances"].gt_masks.tensor
    assert masks.shape == (1, height, width) and out["instances"].gt_classes.tolist() == [1]
    assert np.array_equal(masks[0].numpy(), square[:, ::-1].astype(bool))
    assert out["instances"].gt_boxes.tensor[0].tolist() == [width - 50, 10, width - 20, 30]


def test_mask_on_without_segmentation_is_an_error(registered):
    cfg, records = registered
    record = {
        "file_name": records[0]["file_name"],
        "image_id": 1,
        "annotations": [
            {"bbox": [1, 1, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "id": 7}
        ],
    }
    with pytest.raises(ValueError, match="annotation 7"):
        mapper(cfg, [])(record)


def test_coco_panoptic_layouts():
    """Detectron2's standard COCO panoptic classes: 80 things then 53 stuff; the official
    checkpoints' own layout (NUM_CLASSES 250): ids <= 90 are things."""
    cfg = tiny_cfg(NUM_CLASSES=133)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (
        ("coco_2017_train_panoptic",),
        ("coco_2017_val_panoptic",),
    )
    assert thing_ids_from_cfg(cfg) == list(range(80))
    rows = coco_class_rows(cfg)
    assert len(rows) == 133 and rows[0] == 1 and rows[80] == 92 and max(rows) == 200
    cfg.MODEL.DETR.NUM_CLASSES = 250
    assert thing_ids_from_cfg(cfg) == list(range(91)) and coco_class_rows(cfg) is None
    cfg.MODEL.DETR.NUM_CLASSES = 80
    assert thing_ids_from_cfg(cfg) is None and len(coco_class_rows(cfg)) == 80
    cfg.MODEL.DETR.TEST.PANOPTIC_ON = True
    cfg.DATASETS.TEST = ("coco_2017_val_panoptic_separated",)
    with pytest.raises(ValueError, match="coco_2017_val_panoptic"):
        thing_ids_from_cfg(cfg)


@pytest.mark.parametrize("change", ["drop_listed", "add_listed"])
def test_png_ids_must_match_segments_info(registered, change):
    cfg, records = registered
    record = copy.deepcopy(records[0])
    if change == "drop_listed":  # a PNG segment without its segments_info entry
        removed = record["segments_info"].pop(0)["id"]
        expected = rf"ids only in the PNG \[{removed}\], only in segments_info \[\]"
    else:  # a listed segment that the PNG does not contain
        record["segments_info"].append(dict(record["segments_info"][0], id=123456))
        expected = r"ids only in the PNG \[\], only in segments_info \[123456\]"
    with pytest.raises(
        ValueError, match=rf"image id {record['image_id']}: panoptic PNG .*{expected}"
    ):
        mapper(cfg, [])(record)
