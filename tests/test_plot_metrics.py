"""tools/plot_metrics.py on synthetic Detectron2 metrics.json files: a resumed run, missing keys,
evaluation rows, and the errors for missing or empty files."""

import json
import logging
import math
import subprocess
import sys

import pytest
from PIL import Image

from helpers import REPO, load_tool

TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def train_row(iteration, offset=0.0, aux_layers=2, drop=()):
    row = {
        "iteration": iteration,
        "lr": 1e-4 if iteration < 60 else 1e-5,
        "time": 0.3,
        "data_time": 0.01,
    }
    base = 2.0 * math.exp(-iteration / 50) + 0.3 + offset
    for term, weight in zip(TERMS, (1.0, 5.0, 2.0)):
        row[term] = weight * base
        for layer in range(aux_layers):
            row[f"{term}_{layer}"] = weight * base * 1.2
    row["total_loss"] = sum(v for k, v in row.items() if k.startswith("loss_"))
    row["class_error"] = 80 * math.exp(-iteration / 30)
    row["cardinality_error"] = 3.0
    for key in drop:
        row.pop(key)
    return row


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tool():
    return load_tool("plot_metrics")


@pytest.fixture
def resumed_run(tmp_path):
    """Iterations 9..79 and an evaluation at 49, then a resume from 39 to 99 (values + 1)."""
    rows = [train_row(i) for i in range(9, 80, 10)]
    rows.insert(
        5,
        {
            "iteration": 49,
            "bbox/AP": 10.0,
            "bbox/AP50": 20.0,
            "bbox/AP75": 8.0,
            "bbox/APs": 1.0,
            "bbox/APm": 5.0,
            "bbox/APl": 15.0,
            "bbox/AP-face": 10.0,
        },
    )
    rows += [
        train_row(i, offset=1.0, drop=("class_error",) if i == 59 else ())
        for i in range(39, 100, 10)
    ]
    rows.append(
        {"iteration": 99, "bbox/AP": 12.0, "bbox/AP50": 25.0, "bbox/AP75": 9.0}
    )  # no size breakdown
    return write_rows(tmp_path / "metrics.json", rows)


def png_ok(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 500 and image.size[1] >= 300, (
            path,
            image.size,
        )


def test_resumed_run_keeps_later_values(tool, resumed_run, caplog):
    with caplog.at_level(logging.INFO):
        series = tool.read_metrics(resumed_run)
    assert "resumed run" in caplog.text and "back from 79 to 39" in caplog.text
    assert sorted(series["total_loss"]) == list(range(9, 100, 10))
    assert series["loss_ce"][49] == pytest.approx(
        1.0 * (2.0 * math.exp(-49 / 50) + 1.3)
    )  # the resumed run's
    assert series["loss_ce"][29] == pytest.approx(
        2.0 * math.exp(-29 / 50) + 0.3
    )  # only in the first run
    # a row of the resumed run without class_error keeps the first run's value for it
    assert series["class_error"][59] == pytest.approx(80 * math.exp(-59 / 30))
    assert series["bbox/AP"] == {49: 10.0, 99: 12.0}


def test_writes_every_plot(tool, resumed_run, tmp_path, caplog):
    out = tmp_path / "plots"
    with caplog.at_level(logging.INFO):
        written = tool.plot_metrics(resumed_run, out, smooth=3)
    names = [p.name for p in written]
    assert names == [
        "losses.png",
        "loss_terms.png",
        "lr.png",
        "class_error.png",
        "cardinality_error.png",
        "eval_bbox.png",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for path in written:
        png_ok(path)
    assert "per-class metrics not drawn (e.g. AP-face)" in caplog.text


def test_missing_keys_skip_their_plots(tool, tmp_path, caplog):
    """A run without lr, error metrics, aux losses or evaluation: those plots are skipped."""
    rows = [
        train_row(i, aux_layers=0, drop=("lr", "class_error", "cardinality_error"))
        for i in range(9, 50, 10)
    ]
    rows.append({"iteration": 60})  # a row with nothing to plot
    metrics = write_rows(tmp_path / "metrics.json", rows)
    with caplog.at_level(logging.INFO):
        written = tool.plot_metrics(metrics, tmp_path / "plots")
    assert [p.name for p in written] == ["losses.png", "loss_terms.png"]
    for name in ("lr.png", "class_error.png", "cardinality_error.png", "eval_*.png"):
        assert f"Skipping {name}" in caplog.text


def test_evaluation_only(tool, tmp_path):
    metrics = write_rows(
        tmp_path / "metrics.json",
        [
            {
                "iteration": 0,
                "panoptic_seg/PQ": 40.0,
                "panoptic_seg/SQ": 70.0,
                "panoptic_seg/RQ": 50.0,
                "panoptic_seg/PQ_th": 45.0,
                "panoptic_seg/PQ_st": 30.0,
                "segm/AP": 30.0,
            },
        ],
    )
    written = tool.plot_metrics(metrics, tmp_path / "plots")
    assert [p.name for p in written] == ["eval_panoptic_seg.png", "eval_segm.png"]


def test_errors_name_the_file(tool, tmp_path, caplog):
    missing = tmp_path / "nothing_here"
    assert tool.main([str(missing)]) == 1
    assert str(missing / "metrics.json") in caplog.text and "no such file" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.json").write_text("\n")
    with pytest.raises(ValueError, match="metrics.json holds no metrics rows"):
        tool.plot_metrics(empty / "metrics.json", tmp_path / "plots")


def test_command_line(resumed_run, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/plot_metrics.py"),
            str(resumed_run.parent),
            "--smooth",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote 6 plots" in result.stdout and "resumed run" in result.stderr
    assert (resumed_run.parent / "plots" / "eval_bbox.png").is_file()
