"""DETR augmentations and dataset mapper: size rules, crop bounds, branch choice, targets."""

import itertools

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from detr_d2.config import add_detr_config
from detr_d2.data.augmentation import (
    DetrResizeShortestEdge,
    RandomSelect,
    RandomSizeCrop,
    build_detr_augmentation,
)
from detr_d2.data.dataset_mapper import DetrDatasetMapper

DETR_SCALES = tuple(range(480, 801, 32))


def official_size(w, h, size, max_size=None):
    """Official DETR ``get_size_with_aspect_ratio`` (datasets/transforms.py), restated."""
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize("max_size", [None, 1333, 1000, 700])
def test_resize_size_rule_matches_official(max_size):
    sides = [1, 2, 3, 7, 100, 333, 383, 384, 480, 500, 599, 640, 800, 801, 1333, 2000, 4000]
    for w, h in itertools.product(sides, sides):
        for size in (1, 400, 480, 512, 600, 800):
            got = DetrResizeShortestEdge.get_output_shape(h, w, size, max_size)
            assert got == official_size(w, h, size, max_size), (w, h, size, max_size)


def test_resize_branches():
    # Shorter side already equal to the size: unchanged (and no rounding of the long side).
    assert DetrResizeShortestEdge.get_output_shape(800, 1201, 800, 1333) == (800, 1201)
    # Long side truncated, not rounded (Detectron2's ResizeShortestEdge would give 1067).
    assert DetrResizeShortestEdge.get_output_shape(480, 640, 800, 1333) == (800, 1066)
    assert T.ResizeShortestEdge.get_output_shape(480, 640, 800, 1333) == (800, 1067)
    # Max-size branch: size becomes round(1333 * 400 / 1600) = 333, long side int(1332.0).
    assert DetrResizeShortestEdge.get_output_shape(400, 1600, 800, 1333) == (333, 1332)
    assert DetrResizeShortestEdge.get_output_shape(1600, 400, 800, 1333) == (1332, 333)
    # round(666.5) = 666: Python rounds half to even, as the official code does.
    assert DetrResizeShortestEdge.get_output_shape(100, 200, 800, 1333) == (666, 1332)
    # No max size (official pre-crop resize).
    assert DetrResizeShortestEdge.get_output_shape(400, 1600, 600, None) == (600, 2400)


def test_resize_transform_and_sampling():
    image = np.random.RandomState(0).randint(0, 256, (90, 120, 3), dtype=np.uint8)
    aug = DetrResizeShortestEdge([30, 45, 60], max_size=1000)
    np.random.seed(0)
    seen = set()
    for _ in range(200):
        tfm = aug.get_transform(image)
        assert isinstance(tfm, T.ResizeTransform)
        assert tfm.interp == Image.BILINEAR
        seen.add((tfm.new_h, tfm.new_w))
    assert seen == {(30, 40), (45, 60), (60, 80)}
    out = T.AugInput(image)
    DetrResizeShortestEdge(45)(out)
    assert out.image.shape == (45, 60, 3)
    # Same pixels as resizing the PIL image with PIL bilinear (what torchvision does).
    expected = np.asarray(Image.fromarray(image).resize((60, 45), Image.BILINEAR))
    np.testing.assert_array_equal(out.image, expected)


# ---------------------------------------------------------------- crop


def test_random_size_crop_bounds():
    np.random.seed(0)
    aug = RandomSizeCrop(384, 600)
    for h, w in [(480, 640), (600, 600), (800, 1200), (384, 1000), (1000, 384)]:
        image = np.zeros((h, w, 3), dtype=np.uint8)
        widths, heights, lefts, tops = set(), set(), set(), set()
        for _ in range(300):
            tfm = aug.get_transform(image)
            assert isinstance(tfm, T.CropTransform)
            assert 384 <= tfm.w <= min(w, 600) and 384 <= tfm.h <= min(h, 600)
            assert 0 <= tfm.x0 <= w - tfm.w and 0 <= tfm.y0 <= h - tfm.h
            widths.add(tfm.w)
            heights.add(tfm.h)
            lefts.add(tfm.x0)
            tops.add(tfm.y0)
        # Random sizes and positions actually vary where they can.
        assert len(widths) > 1 or min(w, 600) == 384
        assert len(heights) > 1 or min(h, 600) == 384
        assert len(lefts) > 1 or w == 384
        assert len(tops) > 1 or h == 384


def test_random_size_crop_inclusive_ends():
    np.random.seed(1)
    aug = RandomSizeCrop(3, 5)
    image = np.zeros((6, 7), dtype=np.uint8)
    tfms = [aug.get_transform(image) for _ in range(500)]
    assert {t.w for t in tfms} == {3, 4, 5}
    assert {t.h for t in tfms} == {3, 4, 5}
    assert {t.x0 for t in tfms} == set(range(0, 7 - 3 + 1))
    assert {t.y0 for t in tfms} == set(range(0, 6 - 3 + 1))


def test_random_size_crop_smaller_than_min_size():
    np.random.seed(0)
    aug = RandomSizeCrop(384, 600)
    image = np.arange(100 * 500 * 3, dtype=np.uint8).reshape(100, 500, 3)
    for _ in range(100):
        tfm = aug.get_transform(image)
        assert tfm.h == 100 and tfm.y0 == 0  # whole short side
        assert 384 <= tfm.w <= 500
        np.testing.assert_array_equal(tfm.apply_image(image), image[:, tfm.x0 : tfm.x0 + tfm.w])
    tfm = aug.get_transform(np.zeros((50, 60, 3), dtype=np.uint8))
    assert (tfm.x0, tfm.y0, tfm.w, tfm.h) == (0, 0, 60, 50)


# ---------------------------------------------------------------- select


def test_random_select_frequency_and_boxes():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 20.0, 50.0, 60.0]])
    select = RandomSelect(
        DetrResizeShortestEdge(50), [T.HFlipTransform(200), RandomSizeCrop(80, 80)]
    )
    np.random.seed(0)
    n, n_first = 2000, 0
    for _ in range(n):
        aug_input = T.AugInput(image, boxes=boxes.copy())
        tfms = select(aug_input)
        assert isinstance(tfms, T.TransformList)
        if len(tfms.transforms) == 1:
            n_first += 1
            (tfm,) = tfms.transforms
            assert isinstance(tfm, T.ResizeTransform)
            np.testing.assert_allclose(aug_input.boxes, [[5.0, 10.0, 25.0, 30.0]])
            assert aug_input.image.shape == (50, 100, 3)
        else:
            flip, crop = tfms.transforms
            assert isinstance(flip, T.HFlipTransform) and isinstance(crop, T.CropTransform)
            assert aug_input.image.shape == (80, 80, 3)
            expected = np.array([[150.0 - crop.x0, 20.0 - crop.y0, 190.0 - crop.x0, 60 - crop.y0]])
            np.testing.assert_allclose(aug_input.boxes, expected)
            np.testing.assert_allclose(tfms.apply_box(boxes), expected)
    assert abs(n_first / n - 0.5) < 0.04

    np.random.seed(0)
    biased = RandomSelect(DetrResizeShortestEdge(50), DetrResizeShortestEdge(60), prob=0.2)
    sizes = [biased(T.AugInput(image)).transforms[0].new_h for _ in range(n)]
    assert abs(sizes.count(50) / n - 0.2) < 0.03
    assert "RandomSelect(" in repr(biased)


# ---------------------------------------------------------------- build from cfg


def _detr_cfg():
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = DETR_SCALES
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.MIN_SIZE_TEST = 800
    cfg.INPUT.MAX_SIZE_TEST = 1333
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = [384, 600]
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def test_build_detr_augmentation_structure():
    cfg = _detr_cfg()
    flip, select = build_detr_augmentation(cfg, is_train=True)
    assert isinstance(flip, T.RandomFlip) and flip.horizontal and flip.prob == 0.5
    assert isinstance(select, RandomSelect) and select.prob == 0.5
    (resize,) = select.first.augs
    assert isinstance(resize, DetrResizeShortestEdge)
    assert resize.short_edge_lengths == DETR_SCALES and resize.max_size == 1333
    pre, crop, post = select.second.augs
    assert isinstance(pre, DetrResizeShortestEdge)
    assert pre.short_edge_lengths == (400, 500, 600) and pre.max_size is None
    assert isinstance(crop, RandomSizeCrop) and (crop.min_size, crop.max_size) == (384, 600)
    assert isinstance(post, DetrResizeShortestEdge)
    assert post.short_edge_lengths == DETR_SCALES and post.max_size == 1333

    (test_resize,) = build_detr_augmentation(cfg, is_train=False)
    assert isinstance(test_resize, DetrResizeShortestEdge)
    assert test_resize.short_edge_lengths == (800,) and test_resize.max_size == 1333

    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.RANDOM_FLIP = "none"
    (resize,) = build_detr_augmentation(cfg, is_train=True)
    assert isinstance(resize, DetrResizeShortestEdge)
    assert resize.short_edge_lengths == DETR_SCALES and resize.max_size == 1333


# ---------------------------------------------------------------- mapper

W, H = 200, 100


def _dataset_dict(tmp_path, annotations=None, mode="RGB", name="img.png"):
    array = np.zeros((H, W, 3), dtype=np.uint8)
    array[:, : W // 2] = (255, 0, 0)  # left half red, to see the flip
    image = Image.fromarray(array)
    if mode != "RGB":
        image = image.convert(mode)
    path = tmp_path / name
    image.save(path)
    if annotations is None:
        annotations = [
            {"bbox": [10, 20, 30, 40], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1},
            # crowd: dropped, as in the official code
            {
                "bbox": [60, 10, 20, 20],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 3,
                "iscrowd": 1,
            },
            {
                "bbox": [150, 60, 40, 30],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 2,
                "iscrowd": 0,
                "segmentation": [[150, 60, 190, 60, 190, 90]],
            },
        ]
    return {
        "file_name": str(path),
        "height": H,
        "width": W,
        "image_id": 7,
        "annotations": annotations,
    }


def test_mapper_flip_resize(tmp_path):
    mapper = DetrDatasetMapper(
        is_train=True,
        augmentations=[T.RandomFlip(prob=1.0), DetrResizeShortestEdge([50], max_size=1333)],
        image_format="RGB",
    )
    d = _dataset_dict(tmp_path)
    out = mapper(d)
    assert "instances" not in d and len(d["annotations"]) == 3  # input left untouched
    image = out["image"]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 50, 100)
    assert image[0, :, 75].eq(255).all() and image[0, :, 25].eq(0).all()  # red moved right
    assert (out["height"], out["width"]) == (H, W)
    inst = out["instances"]
    assert inst.image_size == (50, 100)
    # flipped x: 200 - x, then scaled by 50 / 100 = 0.5
    expected = torch.tensor([[80.0, 10.0, 95.0, 30.0], [5.0, 30.0, 25.0, 45.0]])
    torch.testing.assert_close(inst.gt_boxes.tensor, expected)
    assert inst.gt_classes.tolist() == [1, 2]
    assert not inst.has("gt_masks")


def test_mapper_crop_removes_cut_out_boxes(tmp_path):
    annotations = _dataset_dict(tmp_path)["annotations"] + [
        {"bbox": [100, 0, 50, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 4},
    ]
    mapper = DetrDatasetMapper(
        is_train=True,
        augmentations=[T.CropTransform(0, 0, 120, 100), DetrResizeShortestEdge([50])],
        image_format="RGB",
    )
    out = mapper(_dataset_dict(tmp_path, annotations))
    assert tuple(out["image"].shape) == (3, 50, 60)
    inst = out["instances"]
    # box 2 (x in 150..190) is outside the crop: removed; box 4 is clipped at x = 120.
    torch.testing.assert_close(
        inst.gt_boxes.tensor, torch.tensor([[5.0, 10.0, 20.0, 30.0], [50.0, 0.0, 60.0, 10.0]])
    )
    assert inst.gt_classes.tolist() == [1, 4]


def test_mapper_empty_annotations_and_test_mode(tmp_path):
    augs = [DetrResizeShortestEdge([50])]
    train = DetrDatasetMapper(is_train=True, augmentations=augs, image_format="RGB")
    for d in (_dataset_dict(tmp_path, annotations=[]), _dataset_dict(tmp_path)):
        if not d["annotations"]:
            inst = train(d)["instances"]
        else:
            d["annotations"] = [a for a in d["annotations"] if a.get("iscrowd", 0)]
            inst = train(d)["instances"]  # only a crowd box: nothing left
        assert tuple(inst.gt_boxes.tensor.shape) == (0, 4)
        assert tuple(inst.gt_classes.shape) == (0,) and inst.gt_classes.dtype == torch.int64
    d = _dataset_dict(tmp_path)
    del d["annotations"]
    assert len(train(d)["instances"]) == 0

    test = DetrDatasetMapper(is_train=False, augmentations=augs, image_format="RGB")
    out = test(_dataset_dict(tmp_path))
    assert "instances" not in out and "annotations" not in out
    assert tuple(out["image"].shape) == (3, 50, 100)


def test_mapper_from_config(tmp_path):
    cfg = _detr_cfg()
    train = DetrDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    for _ in range(4):
        out = train(_dataset_dict(tmp_path))
        h, w = out["image"].shape[1:]
        assert min(h, w) in DETR_SCALES and max(h, w) <= 1333
        boxes = out["instances"].gt_boxes.tensor
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
    test = DetrDatasetMapper(cfg, is_train=False)
    out = test(_dataset_dict(tmp_path))
    # 2:1 image: size = round(1333 * 100 / 200) = 666 (half to even), long side 1332
    assert tuple(out["image"].shape) == (3, 666, 1332)
    assert "instances" not in out


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_mapper_loads_rgba_and_gray_as_rgb(tmp_path, mode):
    mapper = DetrDatasetMapper(
        is_train=True, augmentations=[DetrResizeShortestEdge([H])], image_format="RGB"
    )
    out = mapper(_dataset_dict(tmp_path, mode=mode, name=f"img_{mode}.png"))
    image = out["image"]
    assert tuple(image.shape) == (3, H, W) and image.dtype == torch.uint8
    if mode == "RGBA":
        assert image[:, 0, 0].tolist() == [255, 0, 0]
    else:
        assert image[0, 0, 0] == image[1, 0, 0] == image[2, 0, 0] > 0
