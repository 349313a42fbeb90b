"""End to end through tools/train_net.py on generated sample faces: train a few iterations,
checkpoint, resume, evaluate with Detectron2's COCOEvaluator (TEST.COCO_EVAL_BACKEND "auto")."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import CONFIGS, INSTANT, REPO, sample_face_opts, train_net


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    return sample_face_opts(
        tmp_path_factory.mktemp("faces"), "faces_tiny", num_train=12, num_val=6, seed=3
    )


def test_train_resume_and_evaluate(sample_data, tmp_path):
    out = tmp_path / "run"
    log = train_net("--config-file", INSTANT, *sample_data, "OUTPUT_DIR", out)
    assert "Starting training from iteration 0" in log
    assert (out / "model_0000001.pth").exists() and (out / "model_final.pth").exists()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    train_rows = [m for m in metrics if "total_loss" in m]
    assert train_rows and all(torch.isfinite(torch.tensor(m["total_loss"])) for m in train_rows)
    assert "class_error" in train_rows[-1] and "loss_giou_0" in train_rows[-1]
    # the console line is compact: last-layer terms and a sum per branch (detr_d2.training_log)
    lines = [line for line in log.splitlines() if " iter: " in line and "total_loss" in line]
    assert lines and all("aux: " in line and "loss_giou_0" not in line for line in lines)
    assert (
        "bbox/AP" in metrics[-1] and "bbox/AP50" in metrics[-1]
    )  # COCOEvaluator ran after training

    # --resume continues from the last checkpoint to a longer schedule
    log = train_net(
        "--config-file", INSTANT, "--resume", *sample_data, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 6
    )
    assert "Starting training from iteration 4" in log
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"

    # --eval-only on the saved weights reports COCO AP for the val split
    log = train_net(
        "--config-file",
        INSTANT,
        "--eval-only",
        *sample_data,
        "OUTPUT_DIR",
        tmp_path / "eval",
        "MODEL.WEIGHTS",
        out / "model_final.pth",
    )
    assert "Evaluation results for bbox" in log and "AP50" in log


def test_missing_dataset_file_names_path_and_key(tmp_path):
    register = json.dumps([["nowhere_train", str(tmp_path / "missing.json"), str(tmp_path)]])
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/train_net.py"),
            "--config-file",
            str(INSTANT),
            "DATASETS.REGISTER_COCO",
            register,
            "DATASETS.TRAIN",
            '("nowhere_train",)',
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert (
        "DATASETS.REGISTER_COCO[0] ('nowhere_train'): annotation file not found: "
        + str(tmp_path / "missing.json")
        in result.stderr
    )


def test_offline_url_weights_fail_at_once(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/train_net.py"),
            "--config-file",
            str(CONFIGS / "detr_r50.yaml"),
            "--eval-only",
            "MODEL.WEIGHTS",
            "http://127.0.0.1:9/detr/detr-r50-e632da11.pth",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode != 0
    assert (
        "pass its local path instead: MODEL.WEIGHTS /path/to/detr-r50-e632da11.pth" in result.stderr
    )


def test_misspelt_eval_backend_fails_before_training(sample_data, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/train_net.py"),
            "--config-file",
            str(INSTANT),
            *sample_data,
            "TEST.COCO_EVAL_BACKEND",
            "fast",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode != 0 and "TEST.COCO_EVAL_BACKEND='fast'" in result.stderr
    assert "Starting training" not in result.stderr + result.stdout
