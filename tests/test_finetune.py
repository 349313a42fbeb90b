"""Fine-tuning from YAML: class rows seeded from named checkpoint classes, pretrained queries
kept, per-part learning rates and frozen parts (MODEL.DETR.INIT, SOLVER.LR_FACTORS)."""

import logging

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import EventStorage

from detr_d2.checkpoint import DetrCheckpointer, safe_torch_load
from detr_d2.finetune import query_subset
from detr_d2.solver import MODEL_PARTS, build_detr_optimizer, model_part

from helpers import (
    CONFIGS,
    LOADING_PATHS,
    build_model_no_weights,
    cfg_for_manifest,
    load_reference,
    load_through,
    make_upstream_checkpoint,
    sample_face_opts,
    tiny_cfg,
    train_net,
)

PERSON_ROW_91 = 1  # official head: row i = COCO category id i


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """An official-layout R50 file (91 classes, 100 queries) and the same file with an
    80-class head (rows of Detectron2's contiguous COCO classes + no-object)."""
    expected, manifest = load_reference("r50")
    folder = tmp_path_factory.mktemp("ckpt")
    path91 = make_upstream_checkpoint(manifest, 0, folder / "detr-r50.pth")
    state = safe_torch_load(str(path91))["model"]
    coco80_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    rows = torch.as_tensor(coco80_ids + [91])
    state80 = dict(state)
    for key in ("class_embed.weight", "class_embed.bias"):
        state80[key] = state[key][rows].clone()
    path80 = folder / "detr-r50-80.pth"
    torch.save({"model": state80}, path80)
    return {"91": path91, "80": path80, "manifest": manifest, "state": state}


def face_cfg(official, weights="91", **init):
    cfg = cfg_for_manifest(official["manifest"]["model"])
    cfg.MODEL.DETR.update(NUM_CLASSES=1, CLASS_NAMES=["face"], NUM_OBJECT_QUERIES=20)
    cfg.MODEL.DETR.INIT.update(CLASSES_FROM=["person"], **init)
    cfg.MODEL.WEIGHTS = str(official[weights])
    return cfg


@pytest.mark.parametrize("weights", ["91", "80"])
@pytest.mark.parametrize("path", LOADING_PATHS)
def test_face_row_seeded_from_person_on_every_loading_path(official, weights, path, caplog):
    cfg = face_cfg(official, weights)
    with caplog.at_level(logging.INFO, logger="detr_d2"):
        model = load_through(path, cfg)
    state = official["state"]
    for name in ("weight", "bias"):
        head = getattr(model.class_embed, name).detach()
        assert torch.equal(head[0], state[f"class_embed.{name}"][PERSON_ROW_91]), name
        assert torch.equal(head[1], state[f"class_embed.{name}"][-1]), name  # no-object row
    assert "face <- person" in caplog.text


def test_kept_queries_equal_the_checkpoints(official, caplog):
    pretrained = official["state"]["query_embed.weight"]
    for policy in ("spread", "first"):
        cfg = face_cfg(official, QUERIES=policy)
        with caplog.at_level(logging.INFO, logger="detr_d2"):
            model = load_through("DetectionCheckpointer", cfg)
        kept = query_subset(pretrained, 20, policy)
        assert len(set(kept.tolist())) == 20
        assert torch.equal(model.query_embed.weight.detach(), pretrained[kept]), policy
        assert "Kept 20 of the checkpoint's 100 object queries" in caplog.text
    assert query_subset(pretrained, 20, "first").tolist() == list(range(20))


def test_spread_queries_are_farther_apart_than_the_first():
    queries = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    queries[:20] *= 0.1  # the first queries crowd together

    def min_gap(index):
        d = torch.cdist(queries[index], queries[index])
        return d[~torch.eye(len(index), dtype=torch.bool)].min()

    assert min_gap(query_subset(queries, 20, "spread")) > min_gap(torch.arange(20))


def test_more_queries_keep_all_and_add_fresh_ones(official):
    cfg = face_cfg(official)
    cfg.MODEL.DETR.NUM_OBJECT_QUERIES = 120
    model = build_model_no_weights(cfg)
    fresh = model.query_embed.weight.detach().clone()
    DetrCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    assert torch.equal(model.query_embed.weight[:100], official["state"]["query_embed.weight"])
    assert torch.equal(model.query_embed.weight[100:], fresh[100:])


def test_unknown_class_name_stops_naming_the_key_and_listing_classes(official):
    cfg = face_cfg(official)
    cfg.MODEL.DETR.INIT.CLASSES_FROM = ["human face"]
    model = build_model_no_weights(cfg)
    with pytest.raises(
        ValueError, match="INIT.CLASSES_FROM: the checkpoint has no class 'human face'"
    ) as e:
        DetrCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    assert "person, bicycle, car" in str(e.value) and "N/A" not in str(e.value)


def test_classes_from_needs_one_name_per_class():
    cfg = tiny_cfg(NUM_CLASSES=2)
    cfg.MODEL.DETR.INIT.CLASSES_FROM = ["person"]
    with pytest.raises(ValueError, match="one checkpoint class name per class"):
        build_model_no_weights(cfg)
    cfg.MODEL.DETR.INIT.update(CLASSES_FROM=[], QUERIES="best")
    with pytest.raises(ValueError, match="MODEL.DETR.INIT.QUERIES"):
        build_model_no_weights(cfg)


def _own_checkpoint(tmp_path):
    """A detr_d2 checkpoint of a 3-class tiny model ("cat", "dog", "car"), 7 queries."""
    cfg = tiny_cfg(NUM_CLASSES=3, CLASS_NAMES=["cat", "dog", "car"])
    model = build_model_no_weights(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # not the fresh initialisation of the same seed
    DetrCheckpointer(model, str(tmp_path)).save("pretrained")
    return tmp_path / "pretrained.pth", model.state_dict()


def test_own_checkpoint_seeds_by_stored_names_and_resumes_as_is(tmp_path):
    path, pretrained = _own_checkpoint(tmp_path)
    cfg = tiny_cfg(NUM_CLASSES=2, CLASS_NAMES=["puppy", "new"], NUM_OBJECT_QUERIES=4)
    cfg.MODEL.DETR.INIT.CLASSES_FROM = ["dog", ""]
    for load in ("DetrCheckpointer", "DetectionCheckpointer"):
        model = build_model_no_weights(cfg)
        fresh = model.class_embed.weight.detach().clone()
        checkpointer = DetrCheckpointer if load == "DetrCheckpointer" else DetectionCheckpointer
        checkpointer(model, str(tmp_path / load)).load(str(path))
        head = model.class_embed.weight.detach()
        assert torch.equal(head[0], pretrained["class_embed.weight"][1])
        assert torch.equal(head[1], fresh[1])  # "" starts fresh
        assert torch.equal(head[2], pretrained["class_embed.weight"][3])  # no-object row
        kept = query_subset(pretrained["query_embed.weight"], 4, "first")
        assert torch.equal(
            model.query_embed.weight.detach(), pretrained["query_embed.weight"][kept]
        )
    # the fine-tuned model's own checkpoint has its classes: it loads as it is (resume, predict)
    DetrCheckpointer(model, str(tmp_path)).save("finetuned")
    again = build_model_no_weights(cfg)
    DetrCheckpointer(again).load(str(tmp_path / "finetuned.pth"))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_parameter_groups_carry_the_part_learning_rates():
    cfg = tiny_cfg("MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS", 2)
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.LR_FACTORS.update(
        BACKBONE=0.01, ENCODER=0.5, DECODER=0.25, HEADS=2.0, TRAINING_AIDS=3.0
    )
    model = build_model_no_weights(cfg)
    optimizer = build_detr_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    parts = set()
    for name, param in model.named_parameters():
        part = model_part(name)
        parts.add(part)
        expected = 1e-4 * cfg.SOLVER.LR_FACTORS[part]
        assert lr_of[id(param)] == pytest.approx(expected), name
    assert parts == set(MODEL_PARTS) - set()  # every part present in this model
    cfg.SOLVER.LR_FACTORS.BACKBONE = -1.0  # the old key decides
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    optimizer = build_detr_optimizer(cfg, build_model_no_weights(cfg))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def _batch():
    from detectron2.structures import Boxes, Instances

    instances = Instances((64, 80))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 40.0, 50.0]]))
    instances.gt_classes = torch.tensor([1])
    image = torch.randint(
        0, 255, (3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return [{"image": image.float(), "instances": instances, "height": 64, "width": 80}]


def test_frozen_parts_get_no_gradient_and_do_not_change():
    cfg = tiny_cfg()
    cfg.SOLVER.LR_FACTORS.update(BACKBONE=0.0, ENCODER=0.0)
    model = build_model_no_weights(cfg)
    optimizer = build_detr_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    with EventStorage():
        for _ in range(2):
            losses = model(_batch())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    for name, param in model.named_parameters():
        frozen = model_part(name) in ("BACKBONE", "ENCODER")
        assert (param.grad is None) == frozen, name
        if frozen:
            assert torch.equal(param, before[name]), name
    assert not torch.equal(model.bbox_embed.layers[0].weight, before["bbox_embed.layers.0.weight"])


def test_a_frozen_backbone_with_a_learning_rate_is_an_error():
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 5
    cfg.SOLVER.LR_FACTORS.BACKBONE = 0.1
    with pytest.raises(
        ValueError, match="FREEZE_AT 5 freezes the whole backbone.*LR_FACTORS.BACKBONE"
    ):
        build_detr_optimizer(cfg, build_model_no_weights(cfg))
    cfg.SOLVER.LR_FACTORS.BACKBONE = 0.0
    build_detr_optimizer(cfg, build_model_no_weights(cfg))
    cfg.SOLVER.LR_FACTORS.DECODER = -0.5
    with pytest.raises(ValueError, match="SOLVER.LR_FACTORS.DECODER must be >= 0"):
        build_detr_optimizer(cfg, build_model_no_weights(cfg))


def test_epoch_schedule_follows_the_training_set():
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BoxMode

    from detr_d2.engine import resolve_epoch_schedule

    def images():
        ann = {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
        return [
            {"file_name": f"{i}.png", "image_id": i, "height": 9, "width": 9, "annotations": [ann]}
            for i in range(50)
        ]

    if "epoch_schedule_test" not in DatasetCatalog:
        DatasetCatalog.register("epoch_schedule_test", images)
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("epoch_schedule_test",)
    cfg.SOLVER.update(IMS_PER_BATCH=4, MAX_ITER=7, STEPS=(5,), WARMUP_ITERS=3)
    resolve_epoch_schedule(cfg)  # EPOCHS.MAX 0: the iteration keys stay
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) == (7, (5,), 3)
    cfg.SOLVER.EPOCHS.update(MAX=10.0, STEPS=[8.0], WARMUP=0.5)
    resolve_epoch_schedule(cfg)  # 50 images / 4 per batch = 12.5 iterations per epoch
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) == (125, (100,), 6)
    cfg.SOLVER.EPOCHS.STEPS = [12.0]
    with pytest.raises(ValueError, match="SOLVER.EPOCHS.STEPS"):
        resolve_epoch_schedule(cfg)


@pytest.mark.parametrize("config", ["detr_face_laptop.yaml", "detr_face_dc5_laptop.yaml"])
def test_laptop_recipe_fine_tunes_an_official_file_through_train_net(config, tmp_path):
    """tools/train_net.py with the laptop config and an official-layout file: the face row
    starts from person, the schedule comes in epochs, the frozen stages do not change and res5 trains."""
    variant = "r50_dc5" if "dc5" in config else "r50"
    expected, manifest = load_reference(variant)
    weights = make_upstream_checkpoint(manifest, 0, tmp_path / f"detr-{variant}.pth")
    data = sample_face_opts(tmp_path / "faces", "faces_ft", num_train=8, num_val=2, seed=5)
    out = tmp_path / "run"
    log = train_net(
        "--config-file", CONFIGS / config, *data, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.EPOCHS.MAX", 0.5, "SOLVER.EPOCHS.STEPS", "()",
        "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", 240, "TEST.EVAL_PERIOD", 0,
    )  # fmt: skip
    assert "8 training images in batches of 2 -> MAX_ITER 2" in log
    assert "face <- person" in log
    cache_line = (
        "Feature cache (MODEL.DETR.SPEED.FEATURE_CACHE): 16 views (8 images x 1 sizes x 2 flips)"
    )
    assert (cache_line in log) == (variant == "r50")  # on in the R50 laptop config only
    official = safe_torch_load(str(weights))["model"]
    trained = safe_torch_load(str(out / "model_final.pth"))["model"]
    assert torch.equal(  # frozen up to res4
        trained["backbone.res4.5.conv3.weight"], official["backbone.0.body.layer3.5.conv3.weight"]
    )
    assert not torch.equal(  # res5 trains
        trained["backbone.res5.2.conv3.weight"], official["backbone.0.body.layer4.2.conv3.weight"]
    )
    assert not torch.equal(trained["class_embed.weight"][0], official["class_embed.weight"][1])
