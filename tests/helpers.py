"""Shared test helpers: configs, models without weights, the reference fixtures, tool loading.

Test modules import from here (``from helpers import ...``), never from each other or from
``conftest.py``.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from detr_d2 import add_detr_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Reference outputs of the official DETR implementation (see its README.md), kept in the repository
# so that a fresh clone runs every parity test.
FIXTURES = REPO / "tests" / "fixtures" / "detr_reference"
INSTANT = CONFIGS / "quick_schedules" / "detr_face_sample_instant_test.yaml"


def make_cfg(config_file=None, opts=()):
    """A frozen-free DETR config on CPU: ``configs/Base-DETR.yaml`` (or ``config_file``) + opts."""
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(str(config_file or CONFIGS / "Base-DETR.yaml"))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def tiny_cfg(*opts, **detr):
    """A DETR small enough for fast CPU tests: R18 trunk, 2+2 layers of width 64; ``detr``
    sets ``MODEL.DETR`` keys, ``opts`` is a ``KEY VALUE ...`` list for any key (both checked to
    exist)."""
    cfg = make_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.DETR.update(
        NUM_CLASSES=3,
        NUM_OBJECT_QUERIES=7,
        HIDDEN_DIM=64,
        NHEADS=4,
        ENC_LAYERS=2,
        DEC_LAYERS=2,
        DIM_FEEDFORWARD=128,
        DROPOUT=0.0,
    )
    unknown = sorted(set(detr) - set(cfg.MODEL.DETR))
    assert not unknown, f"no keys MODEL.DETR.{unknown}"
    cfg.MODEL.DETR.update(**detr)
    cfg.merge_from_list(list(opts))
    return cfg


def build_model_no_weights(cfg):
    """The model of ``cfg`` on CPU, randomly initialised (nothing is loaded)."""
    torch.manual_seed(0)
    return build_model(cfg)


def _fixture(name):
    """The path of a reference fixture file; a missing one skips the test, or fails it in CI
    (``CI=true``), where a skip would hide that the parity tests did not run."""
    path = FIXTURES / name
    if not path.exists():
        message = f"reference fixture {path} not available"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def assert_close(actual, expected, atol, name):
    """Max-abs comparison that names the compared quantity and the difference on failure."""
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"{name}: max abs difference {diff:.3g} > {atol}"


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


def cfg_for_manifest(manifest_model, masks=False):
    """The detr_d2 config matching an official model description (a manifest's ``model``).

    With ``masks`` and a DETRsegm manifest (``masks: true``), the panoptic config of that
    backbone (mask head, backbone outputs res2..res5); otherwise the detection part only.
    """
    depth = int(manifest_model["backbone"].replace("resnet", ""))
    config = {
        (50, False): "detr_r50.yaml",
        (50, True): "detr_r50_dc5.yaml",
        (101, False): "detr_r101.yaml",
        (101, True): "detr_r101_dc5.yaml",
    }[(depth, bool(manifest_model["dilation"]))]
    if masks and manifest_model.get("masks"):
        config = {
            (50, False): "detr_r50_panoptic.yaml",
            (50, True): "detr_r50_dc5_panoptic.yaml",
            (101, False): "detr_r101_panoptic.yaml",
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
        {"image": torch.as_tensor(np.load(_fixture(p))).permute(2, 0, 1).contiguous()}
        for p in expected["images"]
    ]


def reference_model(variant, directory):
    """(expected, eval-mode model, inputs) of a fixture variant, built the way a user loads an
    official checkpoint: YAML config + upstream-format file through the checkpointer."""
    from detr_d2.engine import build_checkpointer

    expected, manifest = load_reference(variant)
    path = Path(directory) / f"upstream_{variant}.pth"
    make_upstream_checkpoint(manifest, expected["args"]["seed"], path)
    cfg = cfg_for_manifest(manifest["model"])
    cfg.MODEL.WEIGHTS = str(path)
    model = build_model_no_weights(cfg)
    build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    return expected, model.eval(), reference_inputs(expected)


LOADING_PATHS = (
    "DefaultPredictor",
    "DetectionCheckpointer",
    "build_checkpointer",
    "load_state_dict",
)


def load_through(path, cfg):
    """The model of ``cfg`` with ``cfg.MODEL.WEIGHTS`` loaded through one of the loading paths
    users take (:data:`LOADING_PATHS`)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor

    from detr_d2.checkpoint import safe_torch_load
    from detr_d2.engine import build_checkpointer

    if path == "DefaultPredictor":
        return DefaultPredictor(cfg.clone()).model
    model = build_model_no_weights(cfg).eval()
    if path == "DetectionCheckpointer":
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    elif path == "build_checkpointer":
        build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    else:
        model.load_state_dict(safe_torch_load(cfg.MODEL.WEIGHTS)["model"])
    return model


def files_under(root):
    """Every file under ``root`` by relative path, with its bytes (byte-identical reruns)."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def load_tool(name):
    """The module of ``tools/<name>.py`` (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"no tool tools/{name}.py"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_cfg(cfg, path):
    """Dump ``cfg`` as a YAML file the command-line tools can read; returns the path."""
    Path(path).write_text(cfg.dump())
    return path


def reference_targets(expected):
    """The fixture's loss targets, with ``masks`` (uint8 [G, H, W] at the image size) loaded
    from ``masks_file`` when the variant has them."""
    targets = []
    for target in expected["targets"]:
        loaded = {"labels": target["labels"], "boxes": target["boxes"]}
        if "masks_file" in target:
            loaded["masks"] = torch.as_tensor(np.load(_fixture(target["masks_file"])))
        targets.append(loaded)
    return targets


def segm_cfg(**detr):
    """:func:`tiny_cfg` with the mask head (backbone outputs res2..res5)."""
    cfg = tiny_cfg(**detr)
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.DETR.CLASS_IS_THING = [True] * cfg.MODEL.DETR.NUM_CLASSES  # a mask model needs it
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return cfg


def coco_dataset_opts(prefix, train_json, train_root, val_json, val_root):
    """Config overrides registering a COCO-format train/val pair as ``<prefix>_train/_val``."""
    register = [
        [f"{prefix}_train", str(train_json), str(train_root)],
        [f"{prefix}_val", str(val_json), str(val_root)],
    ]
    return [
        "DATASETS.REGISTER_COCO",
        json.dumps(register),
        "DATASETS.TRAIN",
        f'("{prefix}_train",)',
        "DATASETS.TEST",
        f'("{prefix}_val",)',
    ]


def sample_face_opts(root, prefix, num_train, num_val, seed):
    """Generate sample faces under ``root`` and return the config overrides that use them."""
    from detr_tools.samples.faces import generate_face_dataset

    generate_face_dataset(str(root), num_train=num_train, num_val=num_val, seed=seed)
    return coco_dataset_opts(
        prefix, root / "train.json", root / "train", root / "val.json", root / "val"
    )


def train_net(*args):
    """Run ``tools/train_net.py`` with ``args`` in a subprocess; returns its stderr + stdout."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools/train_net.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr + result.stdout
