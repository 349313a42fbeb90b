"""The two-stage panoptic recipe end to end on generated sample scenes, through
tools/train_net.py (stage 1: boxes of things and stuff; stage 2: frozen model + mask head, PQ
from panopticapi via COCOPanopticEvaluator, box/mask AP via COCOEvaluator), then
tools/predict.py on the result."""

import json
import subprocess
import sys

import pytest
import torch
from detr_tools.samples.panoptic import generate_panoptic_dataset

from helpers import CONFIGS, REPO

QUICK = CONFIGS / "quick_schedules"


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic_sample")
    generate_panoptic_dataset(root, num_train=8, num_val=3, seed=2)
    rows = [
        [
            f"pan_tiny_{s}",
            f"{root}/{s}",
            f"{root}/panoptic_{s}",
            f"{root}/panoptic_{s}.json",
            f"{root}/instances_{s}.json",
        ]
        for s in ("train", "val")
    ]
    opts = [
        "DATASETS.REGISTER_COCO_PANOPTIC",
        json.dumps(rows),
        "DATASETS.TRAIN",
        '("pan_tiny_train",)',
        "DATASETS.TEST",
        '("pan_tiny_val",)',
    ]
    return root, opts


def run_tool(tool, *args):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr + result.stdout


@pytest.fixture(scope="module")
def stages(sample_data, tmp_path_factory):
    _, opts = sample_data
    out = tmp_path_factory.mktemp("runs")
    run_tool(
        "train_net.py",
        "--config-file",
        QUICK / "detr_panoptic_sample_stage1_instant_test.yaml",
        *opts,
        "OUTPUT_DIR",
        out / "stage1",
    )
    stage1 = out / "stage1" / "model_final.pth"
    log = run_tool(
        "train_net.py",
        "--config-file",
        QUICK / "detr_panoptic_sample_instant_test.yaml",
        *opts,
        "MODEL.WEIGHTS",
        stage1,
        "OUTPUT_DIR",
        out / "stage2",
    )
    return out, log


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.json").read_text().splitlines()]


def test_two_stage_recipe_reports_pq_and_ap(stages):
    out, log = stages
    stage1 = metrics(out / "stage1")
    assert "bbox/AP" in stage1[-1] and "loss_giou_0" in stage1[-2]  # box AP of the things
    stage2 = metrics(out / "stage2")
    train_rows = [m for m in stage2 if "total_loss" in m]
    assert train_rows and all(
        torch.isfinite(torch.tensor(m["loss_mask"] + m["loss_dice"])) for m in train_rows
    )
    final = stage2[-1]
    for key in [
        "panoptic_seg/PQ",
        "panoptic_seg/PQ_th",
        "panoptic_seg/PQ_st",
        "bbox/AP",
        "segm/AP",
    ]:
        assert key in final, key
    assert "Panoptic Evaluation Results" in log and "Evaluation results for segm" in log


def test_stage2_changes_only_the_mask_head(stages):
    out, _ = stages
    before = torch.load(out / "stage1" / "model_final.pth", weights_only=False)["model"]
    after = torch.load(out / "stage2" / "model_final.pth", weights_only=False)["model"]
    mask_keys = {k for k in after if k.startswith(("bbox_attention.", "mask_head."))}
    assert mask_keys and not mask_keys & set(before)
    for key, value in before.items():
        if key in after:  # (batch norms became frozen: their num_batches_tracked is gone)
            assert torch.equal(value, after[key]), key


def test_predict_draws_panoptic_and_instances(stages, sample_data, tmp_path):
    out, _ = stages
    root, opts = sample_data
    weights = out / "stage2" / "model_final.pth"
    config = QUICK / "detr_panoptic_sample_instant_test.yaml"
    run_tool(
        "predict.py",
        "--config-file",
        config,
        "--input",
        root / "val",
        "--output",
        tmp_path / "pan",
        *opts,
        "MODEL.WEIGHTS",
        weights,
    )
    predictions = json.loads((tmp_path / "pan" / "predictions.json").read_text())
    assert len(predictions) == 3 and (tmp_path / "pan" / "000001.png").is_file()
    assert all(
        "segments_info" in p and (tmp_path / "pan" / p["panoptic_png"]).is_file()
        for p in predictions
    )
    names = {s["category_name"] for p in predictions for s in p["segments_info"]}
    assert names <= {"face", "ball", "sky", "wall", "ground"}
    run_tool(
        "predict.py",
        "--config-file",
        config,
        "--input",
        root / "val" / "000002.png",
        "--output",
        tmp_path / "inst",
        "--mode",
        "instances",
        "--score-threshold",
        "0",
        *opts,
        "MODEL.WEIGHTS",
        weights,
    )
    (prediction,) = json.loads((tmp_path / "inst" / "predictions.json").read_text())
    assert prediction["instances"] and all(
        "segmentation" in i and len(i["bbox_xyxy"]) == 4 for i in prediction["instances"]
    )
