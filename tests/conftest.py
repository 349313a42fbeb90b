"""Shared test helpers: configs, models without weights, and the reference fixtures."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from detr_d2 import add_detr_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FIXTURES = REPO.parent / "shared" / "fixtures" / "detr_reference"


def make_cfg(config_file=None, opts=()):
    """A frozen-free DETR config on CPU: ``configs/Base-DETR.yaml`` (or ``config_file``) + opts."""
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(str(config_file or CONFIGS / "Base-DETR.yaml"))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def tiny_cfg(**detr):
    """A DETR small enough for fast CPU tests: R18 trunk, 2+2 layers of width 64."""
    cfg = make_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.DETR.update(
        NUM_CLASSES=3, NUM_OBJECT_QUERIES=7, HIDDEN_DIM=64, NHEADS=4, ENC_LAYERS=2, DEC_LAYERS=2,
        DIM_FEEDFORWARD=128, DROPOUT=0.0,
    )
    cfg.MODEL.DETR.update(**detr)
    return cfg


def build_model_no_weights(cfg):
    """The model of ``cfg`` on CPU, randomly initialised (nothing is loaded)."""
    torch.manual_seed(0)
    return build_model(cfg)


def _fixture(name):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not available")
    return path


def load_reference(variant):
    """(expected outputs, manifest) of a fixture variant such as "r50"."""
    expected = torch.load(_fixture(f"expected_{variant}.pt"), weights_only=True)
    manifest = json.loads(_fixture(f"manifest_{variant}.json").read_text())
    return expected, manifest


def make_upstream_checkpoint(manifest, seed, path):
    """Write the synthetic checkpoint of ``manifest`` in the official file format to ``path``."""
    script = _fixture("make_upstream_checkpoint.py")
    spec = importlib.util.spec_from_file_location("make_upstream_checkpoint", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save({"model": module.make_state_dict(manifest, seed)}, path)
    return path


def cfg_for_manifest(manifest_model):
    """The detr_d2 config matching an official model description (a manifest's ``model``)."""
    depth = int(manifest_model["backbone"].replace("resnet", ""))
    config = {
        (50, False): "detr_r50.yaml", (50, True): "detr_r50_dc5.yaml",
        (101, False): "detr_r101.yaml", (101, True): "detr_r101_dc5.yaml",
    }[(depth, bool(manifest_model["dilation"]))]
    cfg = make_cfg(CONFIGS / config)
    cfg.MODEL.DETR.update(
        NUM_CLASSES=manifest_model["num_classes"],
        NUM_OBJECT_QUERIES=manifest_model["num_queries"],
        HIDDEN_DIM=manifest_model["hidden_dim"],
        NHEADS=manifest_model["nheads"],
        ENC_LAYERS=manifest_model["enc_layers"],
        DEC_LAYERS=manifest_model["dec_layers"],
        DIM_FEEDFORWARD=manifest_model["dim_feedforward"],
        PRE_NORM=manifest_model["pre_norm"],
    )
    return cfg


def reference_inputs(expected):
    """The fixture images as Detectron2 inputs (RGB CHW uint8 tensors, unresized)."""
    return [
        {"image": torch.as_tensor(np.load(FIXTURES / p)).permute(2, 0, 1).contiguous()}
        for p in expected["images"]
    ]
