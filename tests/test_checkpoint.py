"""Official checkpoint conversion, class-head remapping and re-initialisation, safe loading."""

import argparse
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch

from detr_d2.checkpoint import (
    DetrCheckpointer,
    convert_official_state_dict,
    download_weights,
    safe_torch_load,
)
from detr_d2.data import coco_class_rows

from helpers import (
    REPO,
    build_model_no_weights,
    cfg_for_manifest,
    load_reference,
    make_upstream_checkpoint,
    tiny_cfg,
)


@pytest.mark.parametrize("variant", ["r50", "r50_dc5", "r50_panoptic"])
def test_conversion_table_covers_the_model(variant):
    """Every official key maps to a parameter or buffer of the same shape, and vice versa
    (the panoptic mask head is checked by the segmentation tests)."""
    _, manifest = load_reference(variant)
    official = {key: torch.empty(shape) for key, shape, _ in manifest["tensors"]}
    cfg = cfg_for_manifest(manifest["model"])
    model = build_model_no_weights(cfg)
    converted, report = convert_official_state_dict(official, cfg.MODEL.DETR.NUM_CLASSES)
    detection = {
        k: v for k, v in converted.items() if not k.startswith(("bbox_attention.", "mask_head."))
    }
    own = model.state_dict()
    assert set(detection) == set(own), set(detection) ^ set(own)
    for key, value in detection.items():
        assert tuple(value.shape) == tuple(own[key].shape), key
    assert not report["remapped"]
    assert (
        "backbone.0.body.layer1.0.downsample.1.running_var -> backbone.res2.0.shortcut.norm.running_var"
        in [line.replace("detr.", "") for line in report["renamed"]]
    )


def test_coco80_remap_picks_rows_by_category_id():
    cfg = tiny_cfg(NUM_CLASSES=80)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("coco_2017_train",), ("coco_2017_val",)
    rows = coco_class_rows(cfg)
    assert len(rows) == 80 and rows[0] == 1 and rows[-1] == 90 and 12 not in rows
    head = torch.arange(92, dtype=torch.float32)[:, None].repeat(1, 4)
    official = {
        "backbone.0.body.conv1.weight": torch.zeros(1),
        "class_embed.weight": head,
        "class_embed.bias": head[:, 0],
    }
    converted, report = convert_official_state_dict(official, 80, rows)
    assert converted["class_embed.weight"][:, 0].tolist() == [float(r) for r in rows] + [91.0]
    assert converted["class_embed.bias"].tolist() == [float(r) for r in rows] + [91.0]
    assert len(report["remapped"]) == 2


def test_head_unchanged_without_a_fitting_class_map():
    head = torch.randn(92, 4)
    official = {
        "backbone.0.body.conv1.weight": torch.zeros(1),
        "class_embed.weight": head,
        "class_embed.bias": head[:, 0],
    }
    converted, _ = convert_official_state_dict(official, 91)
    assert torch.equal(converted["class_embed.weight"], head)
    converted, report = convert_official_state_dict(
        official, 1, class_rows=[95]
    )  # row out of range
    assert torch.equal(converted["class_embed.weight"], head) and not report["remapped"]


@pytest.fixture(scope="module")
def upstream_r50(tmp_path_factory):
    expected, manifest = load_reference("r50")
    return make_upstream_checkpoint(
        manifest, 0, tmp_path_factory.mktemp("ckpt") / "detr-r50.pth"
    ), manifest


def test_fine_tune_reinitialises_class_head_and_queries(upstream_r50, caplog):
    """The face fine-tuning case: 1 class and 20 queries from a 91-class, 100-query file."""
    path, manifest = upstream_r50
    cfg = cfg_for_manifest(manifest["model"])
    cfg.MODEL.DETR.update(NUM_CLASSES=1, NUM_OBJECT_QUERIES=20)
    cfg.MODEL.DETR.INIT.QUERIES = "random"  # kept queries: tests/test_finetune.py
    model = build_model_no_weights(cfg)
    fresh_head = model.class_embed.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="detr_d2"):
        DetrCheckpointer(model).load(str(path))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("detr_d2")]
    assert any(
        "Re-initialised class_embed: the checkpoint has 91 classes, the model 1" in m
        for m in messages
    )
    assert any(
        "Re-initialised query_embed: the checkpoint has 100 queries, the model 20" in m
        for m in messages
    )
    assert torch.equal(model.class_embed.weight, fresh_head)
    official = safe_torch_load(str(path))["model"]
    assert torch.equal(
        model.backbone.res3[1].conv2.weight, official["backbone.0.body.layer2.1.conv2.weight"]
    )
    assert torch.equal(
        model.transformer.decoder.norm.weight, official["transformer.decoder.norm.weight"]
    )


def test_plain_load_state_dict_accepts_official_layout(upstream_r50):
    path, manifest = upstream_r50
    model = build_model_no_weights(cfg_for_manifest(manifest["model"]))
    official = safe_torch_load(str(path))["model"]
    model.load_state_dict(official, strict=True)
    assert torch.equal(
        model.backbone.stem.conv1.norm.running_var, official["backbone.0.body.bn1.running_var"]
    )


def test_converter_tool(upstream_r50, tmp_path):
    path, manifest = upstream_r50
    out = tmp_path / "converted.pth"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/convert_detr_checkpoint.py"),
            str(path),
            str(out),
            "--num-classes",
            "80",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "renamed: 265" in result.stderr and "remapped: 2" in result.stderr, result.stderr
    saved = torch.load(out, weights_only=True)["model"]
    assert saved["class_embed.weight"].shape == (81, 256)
    assert "backbone.res5.2.conv3.norm.weight" in saved


def test_official_args_namespace_is_allowed(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, path)
    assert safe_torch_load(str(path))["args"].lr == 1e-4


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "payload": _RunsCode()}, f)
    with pytest.raises(pickle.UnpicklingError, match="Refusing to load .*evil.pth"):
        safe_torch_load(str(path))


def test_offline_url_fails_fast_with_advice(tmp_path):
    with pytest.raises(
        RuntimeError,
        match=r"pass its local path instead: MODEL.WEIGHTS /path/to/detr-r50-e632da11.pth",
    ):
        download_weights(
            "http://127.0.0.1:9/detr/detr-r50-e632da11.pth", cache_dir=str(tmp_path), timeout=2
        )


def test_download_checks_sha256_prefix_and_caches(tmp_path):
    import hashlib

    payload = tmp_path / "src" / "payload.bin"
    payload.parent.mkdir()
    payload.write_bytes(b"detr weights")
    good = hashlib.sha256(b"detr weights").hexdigest()[:8]
    good_path = payload.with_name(f"detr-x-{good}.pth")
    payload.rename(good_path)
    cache = tmp_path / "cache"
    local = download_weights(good_path.as_uri(), cache_dir=str(cache))
    assert open(local, "rb").read() == b"detr weights"
    bad_path = good_path.with_name("detr-x-00000000.pth")
    bad_path.write_bytes(b"detr weights")
    with pytest.raises(RuntimeError, match="Checksum mismatch"):
        download_weights(bad_path.as_uri(), cache_dir=str(cache))
    assert not (cache / "detr-x-00000000.pth").exists()


def test_converter_tool_remaps_panoptic_head_to_133(tmp_path):
    _, manifest = load_reference("r50_panoptic")
    path = make_upstream_checkpoint(manifest, 0, tmp_path / "detr-r50-panoptic.pth")
    out = tmp_path / "converted.pth"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/convert_detr_checkpoint.py"),
            str(path),
            str(out),
            "--num-classes",
            "133",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "remapped: 2" in result.stderr, result.stderr
    saved = torch.load(out, weights_only=True)["model"]
    official = safe_torch_load(str(path))["model"]
    assert saved["class_embed.weight"].shape == (134, 256)
    assert torch.equal(
        saved["class_embed.weight"][0], official["detr.class_embed.weight"][1]
    )  # person
    assert torch.equal(
        saved["class_embed.weight"][-1], official["detr.class_embed.weight"][250]
    )  # no object
    assert "mask_head.lay1.weight" in saved and "backbone.res2.0.conv1.weight" in saved
