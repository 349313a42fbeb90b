"""tools/benchmark.py (detr_tools.benchmark) writes a complete record for every task."""

import json

import pytest

from helpers import CONFIGS, load_tool, sample_face_opts


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    return sample_face_opts(
        tmp_path_factory.mktemp("faces"), "faces_bench", num_train=8, num_val=4, seed=6
    )


@pytest.mark.parametrize("task", ["inference", "train", "data", "eval"])
def test_benchmark_tool_writes_a_complete_record(task, bench_data, tmp_path, capsys):
    data = bench_data
    benchmark = load_tool("benchmark")
    output = tmp_path / f"{task}.json"
    args = [
        "--config-file",
        str(CONFIGS / "quick_schedules" / "detr_face_sample_instant_test.yaml"),
        "--task",
        task,
        "--warmup",
        "1",
        "--iters",
        "2",
        "--loader-batches",
        "2",
        "--output",
        str(output),
        "--input",
        "dataset" if task == "train" else "synthetic",
        *data,
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]
    if task == "inference":
        args[-2:-2] = ["TEST.PRECISION", "bf16"]
    benchmark.main(args)
    record = json.loads(output.read_text())
    for key in (
        "device",
        "device_name",
        "torch_threads",
        "torch",
        "detectron2",
        "test_precision",
        "peak_rss_mib",
    ):
        assert key in record, key
    if task == "data":
        assert record["mapper_one_worker"]["images_per_second"] > 0
        assert record["loader"]["images_per_second"] > 0
    else:
        assert record["timed_calls"] == 2 and record["images_per_second"] > 0
        assert record["seconds_p25"] <= record["seconds_median"] <= record["seconds_p75"]
    if task == "inference":
        assert record["test_precision"] == "bf16" and record["batch_size"] == 1
    if task == "train":
        assert record["batch_size"] > 0 and len(record["total_loss_first_last"]) == 2
    if task == "eval":
        assert record["images"] == 4 and "AP" in record["results"]["bbox"]
    benchmark.main(["--table", str(output)])
    table = capsys.readouterr().out.strip().splitlines()[-3:]
    assert table[0].startswith("| record | task") and f"| {task} |" in table[2]


def test_train_batches_are_the_trainers_batches(bench_data):
    """--input dataset trains on the first batches of the trainer's own loader: with aspect
    ratio grouping each batch holds one orientation, as in a real run."""
    from detr_tools.benchmark import dataset_batches

    from detr_d2.engine import DetrTrainer

    benchmark = load_tool("benchmark")
    args = benchmark.parse_args(
        [
            "--config-file",
            str(CONFIGS / "quick_schedules" / "detr_face_sample_instant_test.yaml"),
            "--task",
            "train",
            *bench_data,
            "DATALOADER.ASPECT_RATIO_GROUPING",
            "True",
            "DATALOADER.NUM_WORKERS",
            "0",
        ]
    )
    cfg = benchmark.setup(args)
    batches = dataset_batches(cfg, True, batch_size=2, count=3)
    for batch in batches:
        assert len(batch) == 2
        assert len({d["width"] > d["height"] for d in batch}) == 1
    loader = iter(DetrTrainer.build_train_loader(_with_batch(cfg, 2)))
    for batch in batches:
        assert [d["image_id"] for d in batch] == [d["image_id"] for d in next(loader)]


def _with_batch(cfg, batch_size):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.IMS_PER_BATCH = batch_size
    return cfg


def test_compare_interleaves_variants_with_their_own_configs(bench_data, tmp_path, capsys):
    """--compare times the config and each variant in one process, every variant once per
    round; each is built from its own overrides (here a batch of 1 against 2), and the ratios
    refer to the base (whose ratio to itself is exactly 1)."""
    benchmark = load_tool("benchmark")
    output = tmp_path / "compare.json"
    record = benchmark.main(
        [
            "--config-file",
            str(CONFIGS / "quick_schedules" / "detr_face_sample_instant_test.yaml"),
            "--task",
            "train",
            "--input",
            "dataset",
            "--warmup",
            "1",
            "--iters",
            "3",
            "--output",
            str(output),
            "--compare",
            "batch1",
            "SOLVER.IMS_PER_BATCH 1",
            *bench_data,
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ]
    )
    assert json.loads(output.read_text())["variants"].keys() == {"base", "batch1"}
    base, batch1 = record["variants"]["base"], record["variants"]["batch1"]
    assert (base["batch_size"], batch1["batch_size"]) == (2, 1)
    assert base["timed_calls"] == batch1["timed_calls"] == 3
    assert base["ratio_to_first_median"] == 1.0
    assert batch1["ratio_to_first_p25"] <= batch1["ratio_to_first_median"] > 0
    assert len(batch1["total_loss_first_last"]) == 2
    assert record["compare"] == {"batch1": ["SOLVER.IMS_PER_BATCH", "1"]}
    table = capsys.readouterr().out.strip().splitlines()[-2:]
    assert table[0].startswith("| base |") and table[1].startswith("| batch1 |")
