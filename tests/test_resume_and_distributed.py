"""Reliability of training runs: a SIGKILLed run resumes exactly, checkpoints are written
atomically, and 2 CPU processes (gloo) train like 1 process with the same total batch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detr_tools.samples.faces import generate_face_dataset

from detr_d2.checkpoint import DetrCheckpointer

from helpers import CONFIGS, REPO, coco_dataset_opts, sample_face_opts

INSTANT = CONFIGS / "quick_schedules" / "detr_face_sample_instant_test.yaml"


@pytest.fixture(scope="module")
def data_opts(tmp_path_factory):
    return sample_face_opts(
        tmp_path_factory.mktemp("faces"), "faces_rel", num_train=16, num_val=6, seed=5
    )


@pytest.fixture(scope="module")
def square_data_opts(tmp_path_factory):
    """Sample faces resized to 160x160: equal sizes mean equal padding whatever the batch split
    (DETR's padding masks and position encodings depend on the padded batch size)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("square_faces")
    generate_face_dataset(str(root), num_train=16, num_val=6, seed=5)
    for split in ("train", "val"):
        coco = json.loads((root / f"{split}.json").read_text())
        sizes = {}
        for image in coco["images"]:
            path = root / split / image["file_name"]
            sizes[image["id"]] = (160 / image["width"], 160 / image["height"])
            Image.open(path).resize((160, 160), Image.BILINEAR).save(path)
            image["width"] = image["height"] = 160
        for ann in coco["annotations"]:
            sx, sy = sizes[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            ann["bbox"] = [x * sx, y * sy, w * sx, h * sy]
            ann["area"] = w * sx * h * sy
            ann.pop("segmentation", None)
        (root / f"{split}_square.json").write_text(json.dumps(coco))
    return coco_dataset_opts(
        "faces_square",
        root / "train_square.json",
        root / "train",
        root / "val_square.json",
        root / "val",
    )


def command(out, *opts, args=()):
    return [
        sys.executable,
        str(REPO / "tools/train_net.py"),
        "--config-file",
        str(INSTANT),
        *args,
        *map(str, opts),
        "OUTPUT_DIR",
        str(out),
    ]


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def final_state(out):
    return torch.load(out / "model_final.pth", weights_only=True)


# dropout on, so the restored RNG state matters too
SCHEDULE = [
    # one precision for every run: "auto" measures bf16 against fp32 in each process, and two
    # separate runs (not a run and its resume: see test_engine) may choose differently
    "SOLVER.AMP.PRECISION",
    "bf16",
    "SOLVER.MAX_ITER",
    8,
    "SOLVER.CHECKPOINT_PERIOD",
    2,
    "SOLVER.STEPS",
    "(5,)",
    "SEED",
    7,
    "MODEL.DETR.DROPOUT",
    0.1,
    "TEST.EVAL_PERIOD",
    0,
    "DATASETS.TEST",
    "()",
]


# every training-only convergence aid, each with its own state (queries, EMA, dense head,
# denoising encoder and its noise), and the grouped sample stream
TRAINING_AIDS = [
    "MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS",
    3,
    "MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.NUM_QUERIES",
    12,
    "MODEL.DETR.LOSS.CLASS_LOSS",
    "ia_bce",
    "MODEL.DETR.TRAINING_AIDS.DENSE_AUX.ENABLED",
    True,
    "MODEL.DETR.TRAINING_AIDS.DENOISING.GROUPS",  # its noise comes from the RNG state the checkpoint keeps
    2,
    "SOLVER.EMA.ENABLED",
    True,
    "DATALOADER.ASPECT_RATIO_GROUPING",  # the sample config's grouped batches resume exactly too
    True,
]


# the frozen stages' feature cache: no state in the checkpoint, refilled with the same values
FEATURE_CACHE = [
    "MODEL.BACKBONE.FREEZE_AT",
    4,
    "MODEL.RESNETS.NORM",
    "FrozenBN",
    "INPUT.CROP.ENABLED",
    False,
    "MODEL.DETR.SPEED.FEATURE_CACHE.ENABLED",
    True,
]


@pytest.mark.parametrize(
    "aids", [[], TRAINING_AIDS, FEATURE_CACHE], ids=["plain", "training_aids", "feature_cache"]
)
def test_sigkill_then_resume_equals_uninterrupted_run(data_opts, tmp_path, aids):
    reference = tmp_path / "uninterrupted"
    run(command(reference, *data_opts, *SCHEDULE, *aids))

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        command(killed, *data_opts, *SCHEDULE, *aids),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "model_0000003.pth").exists():  # killed right after the second checkpoint
        assert process.poll() is None and time.time() < deadline, (
            "training ended before it could be killed"
        )
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "model_final.pth").exists()
    last = (killed / "last_checkpoint").read_text().strip()
    done = torch.load(killed / last, weights_only=True)["iteration"]

    log = run(command(killed, *data_opts, *SCHEDULE, *aids, args=["--resume"]))
    assert f"Starting training from iteration {done + 1}" in log
    ours, theirs = final_state(killed), final_state(reference)
    assert ours["iteration"] == theirs["iteration"] == 7
    weights = [(ours["model"], theirs["model"])]  # with EMA: the averaged weights
    if aids == TRAINING_AIDS:
        assert any(k.startswith("train_only.") for k in theirs["model"])
        hooks = [s["trainer"]["hooks"]["EMAHook"] for s in (ours, theirs)]
        assert hooks[0]["updates"] == hooks[1]["updates"] == 8
        weights.append((hooks[0]["train_weights"], hooks[1]["train_weights"]))
    for mine, reference_weights in weights:
        for key, value in reference_weights.items():
            assert torch.allclose(mine[key], value, rtol=0, atol=1e-6), key
    optimizer_states = [s["trainer"]["_trainer"]["optimizer"]["state"] for s in (ours, theirs)]
    assert len(optimizer_states[0]) == len(optimizer_states[1]) > 0
    for a, b in zip(*(o.values() for o in optimizer_states)):
        assert torch.allclose(a["exp_avg"], b["exp_avg"], rtol=0, atol=1e-8)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    checkpointer = DetrCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()

    def interrupted_save(data, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000001")
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


@pytest.mark.parametrize(
    "aids",
    [
        [],
        [
            "MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS",
            3,
            "MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.NUM_QUERIES",
            12,
            "MODEL.DETR.LOSS.CLASS_LOSS",
            "focal",
            "MODEL.DETR.TRAINING_AIDS.DENSE_AUX.ENABLED",
            True,
        ],
        FEATURE_CACHE,
    ],
    ids=["plain", "training_aids", "feature_cache"],
)
def test_two_cpu_processes_train_like_one(square_data_opts, tmp_path, aids):
    """Same total batch (4) and seed: 1 process with batch 4 vs 2 gloo processes with 2 each.

    FrozenBN, so no batch statistics differ between the two. The only difference left is float
    rounding: gradients are averaged by an all-reduce instead of summed in one batch, and
    num_boxes and the cross-entropy normaliser are all-reduced (~1e-7 relative). After one step
    the weights agree to 1e-6. From the second step on AdamW divides each gradient by its running
    RMS, which amplifies the rounding of near-zero gradients up to the learning rate (5e-4) per
    step, so the losses of 2 iterations are compared to 1e-4 relative instead. In fp32: bf16
    rounding (the sample config's "auto" precision) would dwarf these tolerances.
    """
    opts = [
        *square_data_opts,
        "SOLVER.IMS_PER_BATCH",
        4,
        "SOLVER.MAX_ITER",
        2,
        "SEED",
        3,
        "MODEL.RESNETS.NORM",
        "FrozenBN",
        "SOLVER.CHECKPOINT_PERIOD",
        1,
        "SOLVER.AMP.ENABLED",
        False,
        *aids,
    ]
    single, double = tmp_path / "one", tmp_path / "two"
    run(command(single, *opts))
    log = run(command(double, *opts, args=["--num-gpus", "2", "--dist-url", "auto"]))
    assert "Running on cpu" in log
    after_one_step = [
        torch.load(out / "model_0000000.pth", weights_only=True)["model"]
        for out in (single, double)
    ]
    for key, value in after_one_step[0].items():
        assert torch.allclose(after_one_step[1][key], value, rtol=0, atol=1e-6), key
    rows = [
        [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
        for out in (single, double)
    ]
    train = [[m for m in r if "total_loss" in m][-1] for r in rows]
    keys = ["total_loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_giou_0"]
    if "MODEL.DETR.TRAINING_AIDS.DENSE_AUX.ENABLED" in aids:
        keys += ["loss_ce_o2m", "loss_bbox_o2m", "loss_dense_cls", "loss_dense_giou"]
    for key in keys:
        assert train[0][key] == pytest.approx(train[1][key], rel=1e-4), key
    # evaluation gathers the predictions of both ranks: all 6 val images are scored
    predictions = json.loads(
        (double / "inference" / "faces_square_val" / "coco_instances_results.json").read_text()
    )
    assert len({p["image_id"] for p in predictions}) == 6
    assert "bbox/AP" in rows[1][-1]
