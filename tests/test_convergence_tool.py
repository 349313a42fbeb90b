"""tools/convergence.py: command lines of the runs, curves read from Detectron2's metrics.json,
the report's tables and plot."""

import json
from pathlib import Path

import pytest
from detr_tools.benchmark import cpu_name
from detr_tools.convergence import (
    collect,
    first_reaching,
    markdown_report,
    plot_curves,
    pretrain_command,
    pretrain_summary,
    reaching_table,
    read_curve,
    speed_command,
    speeds_from_comparison,
    starts_from_pretrain,
    train_command,
)

from helpers import load_tool

SPEC = {
    "config": "configs/detr_face_sample.yaml",
    "overrides": ["SOLVER.MAX_ITER", "20"],
    "eval_sets": ["held", "val"],
    "seeds": [1, 2],
    "variants": {"plain": [], "groups": ["MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS", "4"]},
}


def test_speeds_come_from_one_interleaved_comparison():
    command = speed_command(SPEC, "plain", ["groups"], 12, "/tmp/x.json")
    compare = command.index("--compare")
    assert command[compare : compare + 3] == [
        "--compare",
        "groups",
        "MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS 4",
    ]
    assert command[-2:] == ["SOLVER.MAX_ITER", "20"]  # the spec's overrides on the base config
    record = {
        "variants": {
            "base": {"seconds_median": 0.2, "ratio_to_first_median": 1.0},
            "groups": {"seconds_median": 0.3, "ratio_to_first_median": 1.1},
        }
    }
    speeds = speeds_from_comparison(record, "plain", ["groups"])
    assert speeds == {"plain": 0.2, "groups": pytest.approx(0.22)}


def test_speed_of_a_baseline_without_runs_is_measured(monkeypatch):
    import detr_tools.convergence as convergence

    commands = []

    def benchmark(command, **kwargs):
        commands.append(command)
        record = {
            "variants": {
                "base": {"seconds_median": 0.2, "ratio_to_first_median": 1.0},
                "groups": {"seconds_median": 0.3, "ratio_to_first_median": 1.25},
            }
        }
        Path(command[command.index("--output") + 1]).write_text(json.dumps(record))

    monkeypatch.setattr(convergence.subprocess, "run", benchmark)
    speeds = convergence.measure_speed(SPEC, ["groups"], 5, "plain")  # only "groups" has runs
    assert speeds == {"plain": 0.2, "groups": pytest.approx(0.25)}
    compare = commands[0].index("--compare")  # plain is the config, groups compared with it
    assert commands[0][compare : compare + 3] == [
        "--compare",
        "groups",
        "MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS 4",
    ]


def write_run(root, variant, seed, ap50_held):
    """metrics.json as Detectron2 writes it: training rows, and eval rows of two test sets."""
    path = root / variant / f"seed_{seed}"
    path.mkdir(parents=True)
    rows = []
    for i, ap50 in enumerate(ap50_held):
        rows.append({"iteration": 10 * i + 9, "total_loss": 1.0})
        rows.append(
            {
                "iteration": 10 * i + 9,
                "held/bbox/AP50": ap50,
                "held/bbox/AP": ap50 / 2,
                "val/bbox/AP50": ap50 + 1,
                "val/bbox/AP": 0.0,
            }
        )
    (path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_train_command_adds_overrides_variant_seed_and_output(tmp_path):
    command = train_command(SPEC, "groups", 2, str(tmp_path))
    assert command[-8:] == [
        "SOLVER.MAX_ITER",
        "20",
        "MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS",
        "4",
        "SEED",
        "2",
        "OUTPUT_DIR",
        str(tmp_path / "groups" / "seed_2"),
    ]
    with pytest.raises(KeyError, match="groups"):
        train_command(SPEC, "dense", 1, str(tmp_path))


def test_pretrain_run_and_variants_starting_from_it(tmp_path):
    spec = dict(
        SPEC,
        pretrain={"config": "configs/other.yaml", "overrides": ["MODEL.DETR.NUM_CLASSES", "5"]},
        variants={"aids": [], "scratch": ["MODEL.WEIGHTS", ""]},
    )
    pretrain = pretrain_command(spec, str(tmp_path))
    assert pretrain[2:] == [
        "--resume",  # an interrupted pretraining continues where it stopped
        "--config-file",
        "configs/other.yaml",
        "MODEL.DETR.NUM_CLASSES",
        "5",
        "SEED",
        "1",
        "OUTPUT_DIR",
        str(tmp_path / "pretrain"),
    ]
    weights = str(tmp_path / "pretrain" / "model_final.pth")
    command = train_command(spec, "aids", 1, str(tmp_path))
    assert command[command.index("MODEL.WEIGHTS") + 1] == weights
    # a variant's own MODEL.WEIGHTS comes later on the command line, so it wins
    command = train_command(spec, "scratch", 1, str(tmp_path))
    assert [command[i + 1] for i, a in enumerate(command) if a == "MODEL.WEIGHTS"] == [weights, ""]
    assert starts_from_pretrain(spec, "aids") and not starts_from_pretrain(spec, "scratch")
    assert not starts_from_pretrain(SPEC, "plain")  # no pretrain run in the spec


def test_from_scratch_runs_skip_the_pretrain_run(tmp_path, monkeypatch):
    import detr_tools.convergence as convergence

    spec = dict(
        SPEC, pretrain={"config": "c.yaml"}, variants={"aids": [], "scratch": ["MODEL.WEIGHTS", ""]}
    )
    pretrained, started = [], []
    monkeypatch.setattr(convergence, "_run_pretrain", lambda *a: pretrained.append(1))

    class Done:
        returncode = 0

        def __init__(self, command, **kwargs):
            started.append(command)

        def poll(self):
            return 0

    monkeypatch.setattr(convergence.subprocess, "Popen", Done)
    monkeypatch.setattr(convergence.time, "sleep", lambda s: None)
    convergence.run_experiment(spec, str(tmp_path), ["scratch"], [1])
    assert pretrained == [] and len(started) == 1
    convergence.run_experiment(spec, str(tmp_path), ["aids"], [1])
    assert pretrained == [1] and len(started) == 2


def test_curves_tables_and_plot(tmp_path):
    write_run(tmp_path, "plain", 1, [10.0, 20.0])
    write_run(tmp_path, "plain", 2, [30.0, 40.0])
    write_run(tmp_path, "groups", 1, [50.0, 70.0])
    write_run(tmp_path, "groups", 2, [60.0, 90.0])
    curve = read_curve(tmp_path / "plain" / "seed_1", SPEC["eval_sets"])
    assert curve == {
        "iteration": [10, 20],
        "held/AP": [5.0, 10.0],
        "held/AP50": [10.0, 20.0],
        "val/AP": [0.0, 0.0],
        "val/AP50": [11.0, 21.0],
    }
    results = collect(SPEC, str(tmp_path))
    text = markdown_report(SPEC, results, {"plain": 0.2, "groups": 0.25}, "plain")
    assert "| groups | 0.250 | +25 % |" in text
    only_groups = {"groups": results["groups"]}  # a baseline without runs still gives overheads
    assert "| groups | 0.250 | +25 % |" in markdown_report(
        SPEC, only_groups, {"plain": 0.2, "groups": 0.25}, "plain"
    )
    assert "| groups | 0.250 | — |" in markdown_report(SPEC, only_groups, {"groups": 0.25}, "plain")
    assert "| plain | 20.0 (10.0/30.0) | 30.0 (20.0/40.0) |" in text  # AP50 on held: mean (seeds)
    assert "| groups | 55.0 (50.0/60.0) | 80.0 (70.0/90.0) |" in text
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    speeds = tmp_path / "speeds.json"
    speeds.write_text(json.dumps({"plain": 0.2, "groups": 0.25}))
    tool = load_tool("convergence")
    markdown, plot = tmp_path / "tables.md", tmp_path / "curves.png"
    assert (
        tool.main(
            [
                "report",
                "--spec",
                str(spec_path),
                "--out",
                str(tmp_path),
                "--speeds",
                str(speeds),
                "--markdown",
                str(markdown),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    header, tables = markdown.read_text().split("\n\n", 1)
    assert tables == text  # after a line with the command, date and CPU
    assert header.startswith("Made by `python tools/convergence.py report --spec ")
    assert cpu_name() in header
    assert plot.stat().st_size > 10000


def test_table_columns_are_every_evaluated_iteration(tmp_path):
    write_run(tmp_path, "plain", 1, [10.0, 20.0])  # evaluated at 10, 20
    long = dict(SPEC, variants={"plain": [], "long": []}, seeds=[1])
    path = tmp_path / "long" / "seed_1"
    path.mkdir(parents=True)
    rows = [
        {
            "iteration": 14,
            "held/bbox/AP50": 33.0,
            "held/bbox/AP": 1.0,
            "val/bbox/AP50": 0.0,
            "val/bbox/AP": 0.0,
        }
    ]
    (path / "metrics.json").write_text(json.dumps(rows[0]) + "\n")
    text = markdown_report(long, collect(long, str(tmp_path)), {}, "plain")
    assert "| variant | 10 | 15 | 20 |" in text
    assert "| plain | 10.0 (10.0) | - | 20.0 (20.0) |" in text
    assert "| long | - | 33.0 (33.0) | - |" in text


def test_final_evaluation_counts_the_steps_trained(tmp_path):
    """Detectron2 writes the final evaluation in its own row, at iteration MAX_ITER (one past
    the last step's row): it is still the evaluation after MAX_ITER steps."""
    path = tmp_path / "plain" / "seed_1"
    path.mkdir(parents=True)
    rows = [
        {"iteration": 19, "total_loss": 1.0, "bbox/AP50": 5.0, "bbox/AP": 1.0},
        {"iteration": 39, "total_loss": 1.0},
        # an evaluation period that is no multiple of the writer's: a row of its own
        {"iteration": 44, "bbox/AP50": 7.0, "bbox/AP": 1.5},
        {"iteration": 59, "total_loss": 1.0},
        {"iteration": 60, "bbox/AP50": 9.0, "bbox/AP": 2.0},
    ]
    (path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curve = read_curve(path, ["held"])  # one test set: Detectron2's keys have no set name
    assert curve["iteration"] == [20, 45, 60]
    assert curve["held/AP50"] == [5.0, 7.0, 9.0]


def test_spec_metrics_other_tasks(tmp_path):
    """A spec's ``metrics`` (panoptic stage 2: PQ, mask AP) are read, tabled and plotted; box
    metrics keep their short labels."""
    path = tmp_path / "lr" / "seed_1"
    path.mkdir(parents=True)
    rows = [
        {"iteration": 9, "total_loss": 1.0},
        {"iteration": 10, "panoptic_seg/PQ": 30.0, "segm/AP": 4.0, "bbox/AP": 20.0},
    ]
    (path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = dict(
        SPEC,
        eval_sets=["pan"],
        seeds=[1],
        variants={"lr": []},
        metrics=["panoptic_seg/PQ", "segm/AP", "bbox/AP"],
    )
    curve = read_curve(path, ["pan"], spec["metrics"])
    assert curve == {
        "iteration": [10],
        "pan/panoptic_seg/PQ": [30.0],
        "pan/segm/AP": [4.0],
        "pan/AP": [20.0],
    }
    # rows without every metric are not evaluations of this spec
    assert read_curve(path, ["pan"], ["panoptic_seg/PQ", "segm/AP50"])["iteration"] == []
    text = markdown_report(spec, collect(spec, str(tmp_path)), {}, "lr")
    assert "**panoptic_seg/PQ on `pan`**" in text and "**segm/AP on `pan`**" in text
    assert "| lr | 30.0 (30.0) |" in text and "| lr | 4.0 (4.0) |" in text
    plot = tmp_path / "pq.png"
    plot_curves(spec, collect(spec, str(tmp_path)), {"lr": 0.5}, "pan", str(plot))
    assert plot.stat().st_size > 10000


def test_report_tells_when_each_run_reached_the_target_and_the_pretrain_ap(tmp_path):
    write_run(tmp_path, "plain", 1, [20.0, 91.0, 95.0])
    write_run(tmp_path, "plain", 2, [20.0, 60.0, 89.9])
    write_run(tmp_path, "groups", 1, [92.0, 93.0, 94.0])
    results = collect(SPEC, str(tmp_path))
    assert first_reaching(results["plain"], "held/AP50", 90) == {1: 20, 2: None}
    table = reaching_table(SPEC, results, 90)
    assert "| plain | 20 | - |" in table and "| groups | 10 | not run |" in table
    assert pretrain_summary(SPEC, str(tmp_path)) == ""  # no pretrain in the spec
    spec = dict(SPEC, pretrain={"config": "c.yaml"})
    (tmp_path / "pretrain").mkdir()
    rows = [
        {"iteration": 999, "total_loss": 2.0},
        {"iteration": 999, "bbox/AP50": 55.5, "bbox/AP": 21.9},
    ]
    (tmp_path / "pretrain" / "metrics.json").write_text("\n".join(map(json.dumps, rows)))
    assert "1000: 55.5 / 21.9" in pretrain_summary(spec, str(tmp_path))
