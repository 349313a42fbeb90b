"""Official checkpoints through every Detectron2 loading path, and the model's class layout."""

import logging

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor

from detr_d2.checkpoint import safe_torch_load
from detr_d2.engine import build_checkpointer
from detr_d2.layout import ClassLayout, layout_from_cfg

from helpers import (
    CONFIGS,
    LOADING_PATHS,
    build_model_no_weights,
    cfg_for_manifest,
    load_reference,
    load_through,
    make_cfg,
    make_upstream_checkpoint,
    reference_inputs,
)


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    expected, manifest = load_reference("r50")
    path = make_upstream_checkpoint(
        manifest, expected["args"]["seed"], tmp_path_factory.mktemp("ckpt") / "detr-r50.pth"
    )
    cfg = cfg_for_manifest(manifest["model"])
    cfg.MODEL.DETR.NUM_CLASSES = 80  # Detectron2's COCO classes, the configs' default
    cfg.MODEL.WEIGHTS = str(path)
    rows = [int(i) for i in layout_from_cfg(cfg).dataset_ids] + [91]
    return {
        "cfg": cfg,
        "inputs": reference_inputs(expected),
        "logits": expected["outputs"]["pred_logits"][..., rows],  # official logits of our classes
        "boxes": expected["outputs"]["pred_boxes"],
    }


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_default_predictor_remaps_the_official_head(r50, caplog):
    """Detectron2's DefaultPredictor (its own DetectionCheckpointer) with an official file."""
    with caplog.at_level(logging.WARNING):
        predictor = DefaultPredictor(r50["cfg"].clone())
    assert not any("Skip loading parameter" in r.getMessage() for r in caplog.records)
    raw = predictor.model.predict_raw(r50["inputs"])
    assert max_diff(raw["pred_logits"], r50["logits"]) <= 1e-4
    assert max_diff(raw["pred_boxes"], r50["boxes"]) <= 1e-4
    image = r50["inputs"][0]["image"].permute(1, 2, 0).numpy()  # RGB HWC, INPUT.FORMAT RGB
    instances = predictor(image)["instances"]
    assert len(instances) == 100 and int(instances.pred_classes.max()) < 80


@pytest.mark.parametrize("path", LOADING_PATHS[1:])
def test_every_loading_path_gives_the_same_model(r50, path):
    model = load_through(path, r50["cfg"])
    raw = model.predict_raw(r50["inputs"])
    assert max_diff(raw["pred_logits"], r50["logits"]) <= 1e-4
    assert max_diff(raw["pred_boxes"], r50["boxes"]) <= 1e-4


def test_custom_class_is_not_read_as_the_coco_class_of_its_id(r50, caplog):
    """A one-class face model (dataset id 1, "face") re-initialises the head: COCO's id 1 is
    "person", so no row of the official head fits."""
    cfg = r50["cfg"].clone()
    cfg.MODEL.DETR.update(NUM_CLASSES=1, CLASS_NAMES=["face"], CLASS_DATASET_IDS=[1])
    model = build_model_no_weights(cfg)
    fresh = model.class_embed.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="detr_d2"):
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    assert torch.equal(model.class_embed.weight, fresh)
    assert "Re-initialised class_embed: the checkpoint has 91 classes, the model 1" in caplog.text


def test_a_coco_subset_takes_its_rows(r50):
    cfg = r50["cfg"].clone()
    cfg.MODEL.DETR.update(NUM_CLASSES=2, CLASS_NAMES=["person", "car"], CLASS_DATASET_IDS=[1, 3])
    model = build_model_no_weights(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    official = safe_torch_load(cfg.MODEL.WEIGHTS)["model"]["class_embed.weight"]
    assert torch.equal(model.class_embed.weight, official[[1, 3, 91]])


def _panoptic_sample_cfg():
    return make_cfg(CONFIGS / "detr_panoptic_sample.yaml")


def test_panoptic_sample_layout_same_with_and_without_datasets(tmp_path):
    from detr_tools.samples.panoptic import generate_panoptic_dataset

    from detr_d2.data import register_datasets_from_cfg

    unregistered = layout_from_cfg(_panoptic_sample_cfg())
    assert unregistered.names == ("face", "ball", "sky", "wall", "ground")
    assert unregistered.thing_ids == (0, 1) and unregistered.dataset_ids == (1, 2, 3, 4, 5)

    root = tmp_path / "panoptic_sample"
    generate_panoptic_dataset(str(root), num_train=2, num_val=2, seed=0)
    cfg = _panoptic_sample_cfg()
    register = []
    for split in ("train", "val"):
        register.append(
            [
                f"layout_sample_{split}",
                str(root / split),
                str(root / f"panoptic_{split}"),
                str(root / f"panoptic_{split}.json"),
                str(root / f"instances_{split}.json"),
            ]
        )
    cfg.DATASETS.REGISTER_COCO_PANOPTIC = register
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("layout_sample_train",), ("layout_sample_val",)
    register_datasets_from_cfg(cfg)
    registered = layout_from_cfg(cfg)
    assert (registered.names, registered.is_thing, registered.dataset_ids) == (
        unregistered.names,
        unregistered.is_thing,
        unregistered.dataset_ids,
    )
    assert build_model_no_weights(cfg).postprocess.thing_ids == (0, 1)
    cfg.MODEL.DETR.CLASS_IS_THING = [True, False, False, False, False]
    with pytest.raises(ValueError, match=r"MODEL.DETR.CLASS_IS_THING=.*disagrees with dataset"):
        layout_from_cfg(cfg)


def test_mask_model_with_unknown_layout_fails_at_build():
    cfg = _panoptic_sample_cfg()
    cfg.MODEL.DETR.update(CLASS_NAMES=[], CLASS_IS_THING=[], CLASS_DATASET_IDS=[])
    with pytest.raises(ValueError, match="Set MODEL.DETR.CLASS_IS_THING"):
        build_model_no_weights(cfg)


def test_layout_keys_must_have_one_entry_per_class():
    cfg = make_cfg(opts=["MODEL.DETR.NUM_CLASSES", 2, "MODEL.DETR.CLASS_NAMES", '["a"]'])
    with pytest.raises(ValueError, match="MODEL.DETR.CLASS_NAMES has 1"):
        layout_from_cfg(cfg)


def test_saved_checkpoint_carries_the_layout(tmp_path):
    cfg = _panoptic_sample_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    model = build_model_no_weights(cfg)
    build_checkpointer(cfg, model).save("model_final")
    stored = safe_torch_load(str(tmp_path / "model_final.pth"))["class_layout"]
    assert ClassLayout.from_dict(stored).names == ("face", "ball", "sky", "wall", "ground")
