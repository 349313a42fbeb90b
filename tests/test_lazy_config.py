"""configs/lazy/detr_r50.py builds, through Detectron2's LazyConfig/instantiate, the model of
configs/detr_r50.yaml: same parameters, same frozen set, same outputs with the same weights."""

import torch
from detectron2.config import LazyConfig, instantiate

from detr_d2.solver import detr_param_groups

from helpers import CONFIGS, build_model_no_weights, make_cfg

LAZY = CONFIGS / "lazy" / "detr_r50.py"


def test_lazy_config_builds_the_yaml_model():
    lazy_cfg = LazyConfig.load(str(LAZY))
    torch.manual_seed(0)
    lazy = instantiate(lazy_cfg.model)
    yaml = build_model_no_weights(make_cfg(CONFIGS / "detr_r50.yaml"))
    ours, theirs = lazy.state_dict(), yaml.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(lazy) == trainable(yaml)
    layout = lambda m: (m.class_layout.names, m.class_layout.is_thing, m.class_layout.dataset_ids)  # noqa: E731
    assert layout(lazy) == layout(yaml) and lazy.criterion.num_classes == 80
    assert repr(lazy.criterion) == repr(yaml.criterion)
    lazy.load_state_dict(theirs)
    image = [{"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)}]
    a, b = lazy.eval().predict_raw(image), yaml.eval().predict_raw(image)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(
        a["pred_boxes"], b["pred_boxes"]
    )


def test_lazy_optimizer_and_loaders_instantiate():
    lazy_cfg = LazyConfig.load(str(LAZY))
    model = torch.nn.Sequential()
    model.add_module("backbone", torch.nn.Linear(2, 2))
    model.add_module("head", torch.nn.Linear(2, 2))
    lazy_cfg.optimizer.params.model = model
    optimizer = instantiate(lazy_cfg.optimizer)
    lrs = sorted({group["lr"] for group in optimizer.param_groups})
    assert lrs == [1e-5, 1e-4] and type(optimizer).__name__ == "AdamWWithFullModelGradientClip"
    augmentations = instantiate(lazy_cfg.dataloader.train.mapper.augmentations)
    assert len(augmentations) == 2  # flip, then multi-scale resize or pre-resize + crop + resize
    assert detr_param_groups  # the function the config names
