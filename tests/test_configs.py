"""Every YAML in configs/ loads with add_detr_config and builds a model."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from detr_d2 import add_detr_config, precision
from detr_d2.precision import attention_in_fp32, use_channels_last

from helpers import CONFIGS, make_cfg

CONFIG_FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_loads_and_builds(name):
    cfg = make_cfg(CONFIGS / name)
    model = build_model(cfg)
    assert type(model).__name__ == "Detr"
    assert model.class_embed.out_features == cfg.MODEL.DETR.NUM_CLASSES + 1
    assert model.query_embed.num_embeddings == cfg.MODEL.DETR.NUM_OBJECT_QUERIES
    dropouts = {
        type(m).__name__ for m in model.transformer.modules() if isinstance(m, torch.nn.Dropout)
    }
    assert dropouts == {"FastDropout"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if cfg.MODEL.BACKBONE.FREEZE_AT >= 2:
        assert not any(n.startswith(("backbone.stem.", "backbone.res2.")) for n in trainable)


def test_official_configs_match_the_recipe():
    cfg = make_cfg(CONFIGS / "detr_r50.yaml")
    assert cfg.SOLVER.IMS_PER_BATCH == 64 and cfg.SOLVER.BASE_LR == 1e-4
    epochs = cfg.SOLVER.MAX_ITER * 64 / 118287
    assert round(epochs) == 500 and round(cfg.SOLVER.STEPS[0] * 64 / 118287) == 400
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False


def test_dc5_first_res5_block_is_undilated():
    model = build_model(make_cfg(CONFIGS / "detr_r50_dc5.yaml"))
    assert model.backbone.res5[0].conv2.dilation == (1, 1)
    assert all(block.conv2.dilation == (2, 2) for block in model.backbone.res5[1:])
    assert model.backbone.output_shape()["res5"].stride == 16


def test_unknown_key_fails_with_the_key_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        '_BASE_: "%s"\nMODEL:\n  DETR:\n    NUM_CLASSE: 3\n' % (CONFIGS / "Base-DETR.yaml")
    )
    cfg = get_cfg()
    add_detr_config(cfg)
    with pytest.raises(KeyError, match="NUM_CLASSE"):
        cfg.merge_from_file(str(bad))


@pytest.mark.parametrize(
    "key,value", [("MODEL.DETR.POSITION_EMBEDDING", "random"), ("MODEL.DETR.NHEADS", 7)]
)
def test_invalid_values_rejected_with_key(key, value):
    cfg = make_cfg(opts=[key, value])
    with pytest.raises(ValueError, match=key.rsplit(".", 1)[1]):
        build_model(cfg)


def test_bgr_input_is_reordered_to_rgb():
    """The backbone always sees RGB: a BGR image with BGR statistics gives the same outputs."""
    from helpers import tiny_cfg

    rgb_cfg = tiny_cfg()
    bgr_cfg = tiny_cfg()
    bgr_cfg.INPUT.FORMAT = "BGR"
    bgr_cfg.MODEL.PIXEL_MEAN = rgb_cfg.MODEL.PIXEL_MEAN[::-1]
    bgr_cfg.MODEL.PIXEL_STD = rgb_cfg.MODEL.PIXEL_STD[::-1]
    torch.manual_seed(0)
    rgb = build_model(rgb_cfg).eval()
    bgr = build_model(bgr_cfg).eval()
    bgr.load_state_dict(rgb.state_dict())
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    a = rgb.predict_raw([{"image": image}])["pred_logits"]
    b = bgr.predict_raw([{"image": image.flip(0)}])["pred_logits"]
    assert torch.allclose(a, b, atol=1e-5)


def test_wrong_value_type_fails_with_the_key_named():
    cfg = get_cfg()
    add_detr_config(cfg)
    with pytest.raises(ValueError, match="MODEL.DETR.NUM_CLASSES"):
        cfg.merge_from_list(["MODEL.DETR.NUM_CLASSES", "one"])


@pytest.mark.parametrize(
    "old, new",
    [
        ("MODEL.DETR.COST_CLASS", "MODEL.DETR.MATCHER.COST_CLASS"),
        ("MODEL.DETR.CLASS_LOSS", "MODEL.DETR.LOSS.CLASS_LOSS"),
        ("MODEL.DETR.DEEP_SUPERVISION", "MODEL.DETR.LOSS.DEEP_SUPERVISION"),
        ("MODEL.DETR.GROUPS", "MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS"),
        ("MODEL.DETR.ONE_TO_MANY.NUM_QUERIES", "MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.NUM_QUERIES"),
        ("MODEL.DETR.FEATURE_CACHE.ENABLED", "MODEL.DETR.SPEED.FEATURE_CACHE.ENABLED"),
        ("MODEL.DETR.CHANNELS_LAST", "MODEL.DETR.SPEED.MEMORY_FORMAT"),
    ],
)
def test_a_moved_key_fails_naming_its_new_place(old, new, tmp_path):
    """In an ``opts`` list and nested in a YAML file: no setting is silently lost."""
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        make_cfg().merge_from_list([old, "1"])
    *parents, leaf = old.split(".")
    text, indent = "", ""
    for part in parents:
        text += f"{indent}{part}:\n"
        indent += "  "
    (tmp_path / "old.yaml").write_text(f"{text}{indent}{leaf}: 1\n")
    node = ".".join(old.split(".")[:3])  # yacs names the first moved level it meets
    with pytest.raises(KeyError, match=f"{node} was renamed to"):
        make_cfg().merge_from_file(str(tmp_path / "old.yaml"))


def test_a_switch_that_became_the_behaviour_is_ignored():
    cfg = make_cfg()
    cfg.merge_from_list(["MODEL.DETR.FAST_DROPOUT", "False", "SOLVER.FUSED_OPTIMIZER", "False"])
    assert "FAST_DROPOUT" not in cfg.MODEL.DETR and "FUSED_OPTIMIZER" not in cfg.SOLVER


def test_the_tools_name_the_new_key_in_one_line():
    from detr_tools.cli import load_config

    from detr_d2.errors import UserInputError

    with pytest.raises(UserInputError) as error:
        load_config(str(CONFIGS / "detr_face_sample.yaml"), ["MODEL.DETR.GROUPS", "3"])
    assert str(error.value).startswith(
        "command line: Key MODEL.DETR.GROUPS was renamed to "
        "MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS; please update your config."
    )
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "setting, device, channels_last",
    [("auto", "cpu", True), ("contiguous", "cpu", False), ("channels_last", "cpu", True)],
)
def test_memory_format_auto_is_channels_last_on_cpu(setting, device, channels_last):
    assert use_channels_last(setting, device) is channels_last
    cfg = make_cfg(CONFIGS / "detr_r50.yaml")
    cfg.MODEL.DETR.SPEED.MEMORY_FORMAT = setting
    cfg.MODEL.DETR.update(ENC_LAYERS=1, DEC_LAYERS=1)
    model = build_model(cfg)
    weight = model.backbone.stem.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last


def test_attention_precision_auto_follows_amx(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: False)
    assert attention_in_fp32("auto", "cpu") and not attention_in_fp32("autocast", "cpu")
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: True)
    assert not attention_in_fp32("auto", "cpu") and attention_in_fp32("fp32", "cpu")
    assert not attention_in_fp32("auto", "cuda")
    with pytest.raises(ValueError, match="MODEL.DETR.SPEED.ATTENTION_PRECISION"):
        attention_in_fp32("bf16", "cpu")
    with pytest.raises(ValueError, match="MODEL.DETR.SPEED.MEMORY_FORMAT"):
        use_channels_last("NHWC", "cpu")


OLD_RELEASE_YAML = """\
VERSION: 2
MODEL:
  DETR:
    NUM_CLASSES: 1
    COST_CLASS: 2.0
    CLASS_LOSS: ia_bce
    DEEP_SUPERVISION: true
    GROUPS: 5
    ONE_TO_MANY:
      NUM_QUERIES: 20
    DENSE_AUX:
      ENABLED: true
    FEATURE_CACHE:
      ENABLED: false
      MAX_MEMORY_GB: 3.0
    CHANNELS_LAST: false
    ATTENTION_FP32: true
    FAST_DROPOUT: true
    SIZE_DIVISIBILITY_TRAIN: 32
SOLVER:
  FUSED_OPTIMIZER: true
"""


def test_a_file_of_an_earlier_release_loads_with_its_keys_moved(tmp_path, caplog):
    """A run's config.yaml of the release before the groups: every setting lands at its new
    place (no setting lost), with one warning; Detectron2's own loader names the new key."""
    from detr_d2.config import merge_detr_config_file

    path = tmp_path / "config.yaml"
    path.write_text(OLD_RELEASE_YAML)
    cfg = make_cfg()
    with caplog.at_level("WARNING", logger="detr_d2.config"):
        moves = merge_detr_config_file(cfg, str(path))
    assert "MODEL.DETR.GROUPS -> MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS" in moves
    assert sum("read at their new place" in r.message for r in caplog.records) == 1
    detr = cfg.MODEL.DETR
    assert detr.NUM_CLASSES == 1 and detr.MATCHER.COST_CLASS == 2.0
    assert detr.LOSS.CLASS_LOSS == "ia_bce" and detr.LOSS.DEEP_SUPERVISION
    aids = detr.TRAINING_AIDS
    assert aids.QUERY_GROUPS == 5 and aids.ONE_TO_MANY.NUM_QUERIES == 20
    assert aids.ONE_TO_MANY.REPEAT == 6 and aids.DENSE_AUX.ENABLED  # defaults kept beside
    assert detr.SPEED.FEATURE_CACHE.MAX_MEMORY_GB == 3.0
    assert detr.SPEED.MEMORY_FORMAT == "auto" and detr.SPEED.ATTENTION_PRECISION == "fp32"
    assert "FAST_DROPOUT" not in detr and "FUSED_OPTIMIZER" not in cfg.SOLVER
    with pytest.raises(KeyError, match="was renamed to.*merge_detr_config_file"):
        make_cfg().merge_from_file(str(path))
    current = tmp_path / "current.yaml"
    current.write_text(cfg.dump())
    assert merge_detr_config_file(make_cfg(), str(current)) == []  # nothing left to move
    from detr_tools.cli import load_config

    assert load_config(str(path)).MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS == 5  # the tools' path
