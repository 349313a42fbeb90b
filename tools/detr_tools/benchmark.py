"""Speed and memory of DETR: inference, training steps, data loading and evaluation.

Every task times one unit of work (a batch through the model, an optimizer step, one mapped
image, one full evaluation) ``iters`` times after ``warmup`` untimed runs and reports the median
and spread, so one slow run (page cache, a neighbour process) does not decide the number. The
record also says where it was measured (device, threads, precision, versions), because a number
without its machine is meaningless. ``tools/benchmark.py`` is the command line;
``docs/benchmarks.md`` holds measured tables.
"""

import contextlib
import io
import itertools
import logging
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable

import detectron2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, get_detection_dataset_dicts
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from tqdm import tqdm

from detr_d2.data import DetrDatasetMapper, drop_degenerate_boxes
from detr_d2.engine import DetrTrainer, build_step_trainer, resolve_num_workers
from detr_d2.modeling.inference_graph import inference_model
from detr_d2.precision import use_channels_last
from detr_d2.solver import build_detr_optimizer

logger = logging.getLogger(__name__)

TASKS = ("inference", "train", "data", "eval")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], warmup: int, iters: int, device: torch.device, desc: str
) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls (the first calls pay
    for allocator growth, oneDNN/cuDNN kernel selection, lazy initialisation and compilation;
    their total is kept in ``time_calls.last_warmup_seconds``)."""
    start = time.perf_counter()
    for _ in tqdm(range(warmup), desc=f"{desc} (warm-up)", leave=False, disable=None):
        fn()
    _synchronize(device)
    time_calls.last_warmup_seconds = time.perf_counter() - start
    times = []
    for _ in tqdm(range(iters), desc=desc, leave=False, disable=None):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summarize_times(times: list[float], items_per_call: int, unit: str) -> dict:
    """Median, quartiles and extremes of per-call seconds; throughput from the median."""
    p25, p75 = np.percentile(times, [25, 75])
    median = statistics.median(times)
    return {
        "seconds_median": median,
        "seconds_p25": float(p25),
        "seconds_p75": float(p75),
        "seconds_min": min(times),
        "seconds_max": max(times),
        "spread_iqr_percent": 100.0 * float(p75 - p25) / median if median else 0.0,
        f"{unit}_per_second": items_per_call / median if median else float("inf"),
        "timed_calls": len(times),
        "warmup_seconds": getattr(time_calls, "last_warmup_seconds", None),
    }


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_record(device: torch.device) -> dict:
    """Peak resident memory of this process (CPU) or peak allocated tensor memory (GPU)."""
    if device.type == "cuda":
        return {"peak_gpu_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_now_mib": _current_rss_mib(),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_record(cfg: CfgNode) -> dict:
    """Where and how the numbers were measured."""
    device = torch.device(cfg.MODEL.DEVICE)
    return {
        "device": cfg.MODEL.DEVICE,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "detr_d2_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "test_precision": cfg.TEST.PRECISION,
        "train_precision": cfg.SOLVER.AMP.PRECISION if cfg.SOLVER.AMP.ENABLED else "fp32",
        "channels_last": use_channels_last(cfg.MODEL.DETR.SPEED.MEMORY_FORMAT, cfg.MODEL.DEVICE),
        "fold_batchnorm": cfg.TEST.FOLD_BATCHNORM,
        "compile": cfg.TEST.COMPILE,
        "coco_eval_backend": cfg.TEST.COCO_EVAL_BACKEND,
    }


# ------------------------------------------------------------------------------ inputs
def synthetic_batch(
    batch_size: int, height: int, width: int, num_classes: int, seed: int, with_targets: bool
) -> list[dict]:
    """Detectron2 inputs of a fixed size: noise images (DETR's cost does not depend on pixel
    values) and, for training, 1-6 random boxes per image."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        item = {
            "image": torch.randint(
                0, 256, (3, height, width), generator=generator, dtype=torch.uint8
            ),
            "height": height,
            "width": width,
        }
        if with_targets:
            count = int(torch.randint(1, 7, (1,), generator=generator))
            xy = torch.rand(count, 2, generator=generator) * torch.tensor(
                [width * 0.7, height * 0.7]
            )
            wh = (0.05 + 0.25 * torch.rand(count, 2, generator=generator)) * torch.tensor(
                [width, height]
            )
            instances = Instances((height, width))
            instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
            instances.gt_classes = torch.randint(0, num_classes, (count,), generator=generator)
            item["instances"] = instances
        batch.append(item)
    return batch


def _registered_names(cfg: CfgNode, is_train: bool) -> list[str]:
    """``DATASETS.TRAIN`` or ``DATASETS.TEST[0]``, checked to be registered."""
    names, key = (
        (list(cfg.DATASETS.TRAIN), "DATASETS.TRAIN")
        if is_train
        else (list(cfg.DATASETS.TEST[:1]), "DATASETS.TEST")
    )
    missing = [n for n in names if n not in DatasetCatalog.list()]
    if not names or missing:
        raise ValueError(
            f"This benchmark needs registered datasets in {key}, got {names} "
            f"(unregistered: {missing}); register them (DATASETS.REGISTER_COCO), or use "
            "--input synthetic for inference and train."
        )
    return names


def dataset_dicts(cfg: CfgNode, is_train: bool) -> list[dict]:
    """The dataset dicts of ``DATASETS.TRAIN`` (as training sees them) or ``DATASETS.TEST[0]``."""
    names = _registered_names(cfg, is_train)
    dicts = get_detection_dataset_dicts(names, filter_empty=False)
    return drop_degenerate_boxes(dicts, ", ".join(names)) if is_train else dicts


def dataset_batches(cfg: CfgNode, is_train: bool, batch_size: int, count: int) -> list[list[dict]]:
    """``count`` batches of mapped images: for training, the first batches of the trainer's own
    loader (its seeded sample stream, augmentation and aspect ratio grouping, so that the batch
    shapes are those of a real run); for testing, the test set's first images."""
    if is_train:
        _registered_names(cfg, is_train)  # a clear error before the loader's own
        cfg = cfg.clone()
        cfg.defrost()
        cfg.SOLVER.IMS_PER_BATCH = batch_size
        cfg.DATALOADER.NUM_WORKERS = 0
        loader = iter(DetrTrainer.build_train_loader(cfg))
        return [next(loader) for _ in range(count)]
    dicts = dataset_dicts(cfg, is_train)
    mapper = DetrDatasetMapper(cfg, is_train=is_train)
    stream = itertools.cycle(dicts)
    return [[mapper(next(stream)) for _ in range(batch_size)] for _ in range(count)]


# ------------------------------------------------------------------------------ tasks
def inference_call(model: torch.nn.Module, batches: list[list[dict]]) -> Callable[[], None]:
    """One call = one batch through ``model`` in eval mode, post-processing included."""
    model.eval()
    calls = itertools.cycle(batches)

    def run():
        with torch.no_grad():
            model(next(calls))

    return run


def train_call(
    cfg: CfgNode, model: torch.nn.Module, batches: list[list[dict]]
) -> tuple[Callable[[], None], EventStorage]:
    """One call = one iteration of the trainer's own ``run_step`` (forward, matching, losses,
    backward, clipping, optimizer step) on pre-loaded batches, inside its own event storage
    (so that interleaved models keep apart the iteration counts and losses they log)."""
    model.train()
    optimizer = build_detr_optimizer(cfg, model)
    step_trainer = build_step_trainer(cfg, model, itertools.cycle(batches), optimizer)
    storage = EventStorage(0)

    def run():
        with storage:
            step_trainer.run_step()
            step_trainer.iter += 1
            storage.iter += 1

    return run, storage


def first_last_loss(storage: EventStorage) -> list[float] | None:
    if "total_loss" not in storage.histories():
        return None
    losses = storage.history("total_loss").values()
    return [losses[0][0], losses[-1][0]]


def benchmark_inference(
    cfg: CfgNode, model: torch.nn.Module, batches: list[list[dict]], warmup: int, iters: int
) -> dict:
    """Images per second through ``model`` in eval mode, post-processing included."""
    device = torch.device(cfg.MODEL.DEVICE)
    times = time_calls(inference_call(model, batches), warmup, iters, device, "inference")
    return summarize_times(times, len(batches[0]), "images")


def benchmark_train(
    cfg: CfgNode, model: torch.nn.Module, batches: list[list[dict]], warmup: int, iters: int
) -> dict:
    """Seconds per training iteration through the trainer's own ``run_step``, on pre-loaded
    batches: data loading is timed separately by the ``data`` task."""
    device = torch.device(cfg.MODEL.DEVICE)
    run, storage = train_call(cfg, model, batches)
    times = time_calls(run, warmup, iters, device, "train step")
    record = summarize_times(times, len(batches[0]), "images")
    record["total_loss_first_last"] = first_last_loss(storage)
    return record


def benchmark_data(cfg: CfgNode, warmup: int, iters: int, loader_batches: int) -> dict:
    """Training images per second of the dataset mapper in one process (= one loader worker),
    and of Detectron2's loader with ``DATALOADER.NUM_WORKERS`` workers."""
    dicts = dataset_dicts(cfg, is_train=True)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    stream = itertools.cycle(dicts)
    times = time_calls(lambda: mapper(next(stream)), warmup, iters, torch.device("cpu"), "mapper")
    record = {"mapper_one_worker": summarize_times(times, 1, "images")}

    loader = iter(DetrTrainer.build_train_loader(cfg))
    next(loader)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in tqdm(range(loader_batches), desc="loader", leave=False, disable=None):
        next(loader)
    seconds = time.perf_counter() - start
    record["loader"] = {
        "num_workers": resolve_num_workers(cfg),
        "batches": loader_batches,
        "images_per_second": loader_batches * cfg.SOLVER.IMS_PER_BATCH / seconds,
    }
    return record


def benchmark_eval(
    cfg: CfgNode, model: torch.nn.Module, warmup: int, iters: int, output_dir: str
) -> dict:
    """Seconds of one evaluation of ``DATASETS.TEST[0]`` (``process`` of every image +
    ``evaluate``) on predictions computed once beforehand: the evaluator's own cost."""
    dicts = dataset_dicts(cfg, is_train=False)
    mapper = DetrDatasetMapper(cfg, is_train=False)
    model.eval()
    pairs = []
    with torch.no_grad():
        for d in tqdm(dicts, desc="predictions", leave=False, disable=None):
            inputs = [mapper(d)]
            pairs.append((inputs, model(inputs)))
    evaluator = DetrTrainer.build_evaluator(cfg, cfg.DATASETS.TEST[0], output_folder=output_dir)
    results = {}

    def run():
        evaluator.reset()
        for inputs, outputs in pairs:
            evaluator.process(inputs, outputs)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its summary
            results.update(evaluator.evaluate())

    times = time_calls(run, warmup, iters, torch.device("cpu"), "evaluation")
    record = summarize_times(times, len(pairs), "images")
    record["images"] = len(pairs)
    record["results"] = {
        task: {k: v for k, v in m.items() if "-" not in k} for task, m in results.items()
    }
    return record


def run_benchmark(
    cfg: CfgNode,
    task: str,
    *,
    build_model: Callable[[CfgNode], torch.nn.Module],
    input_source: str = "synthetic",
    batch_size: int | None = None,
    image_size: tuple[int, int] | None = None,
    warmup: int = 2,
    iters: int = 10,
    loader_batches: int = 20,
    output_dir: str = "output/benchmark",
) -> dict:
    """One benchmark record (a JSON-able dict) of ``task`` for the model and data of ``cfg``."""
    if task not in TASKS:
        raise ValueError(f"Unknown benchmark task {task!r}; choose from {TASKS}.")
    device = torch.device(cfg.MODEL.DEVICE)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record = {"task": task, **environment_record(cfg), "input": input_source}
    if task == "data":
        record.update(benchmark_data(cfg, warmup, iters, loader_batches))
        record.update(memory_record(device))
        return record

    is_train = task == "train"
    if task == "eval":
        record["input"] = "dataset"
        model = inference_model(build_model(cfg).eval(), cfg)
        record.update(benchmark_eval(cfg, model, warmup, iters, output_dir))
        record.update(memory_record(device))
        return record

    model, batches, shapes = prepare_model_and_batches(
        cfg, is_train, build_model, input_source, batch_size, image_size
    )
    record.update(shapes)
    run = benchmark_train if is_train else benchmark_inference
    record.update(run(cfg, model, batches, warmup, iters))
    record.update(memory_record(device))
    return record


def prepare_model_and_batches(
    cfg: CfgNode,
    is_train: bool,
    build_model: Callable[[CfgNode], torch.nn.Module],
    input_source: str,
    batch_size: int | None,
    image_size: tuple[int, int] | None,
) -> tuple[torch.nn.Module, list[list[dict]], dict]:
    """The model (the inference graph for inference), its input batches and their shapes."""
    batch_size = batch_size or (cfg.SOLVER.IMS_PER_BATCH if is_train else 1)
    if input_source == "synthetic":
        if image_size is None:
            image_size = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        batches = [
            synthetic_batch(
                batch_size, *image_size, cfg.MODEL.DETR.NUM_CLASSES, seed=i, with_targets=is_train
            )
            for i in range(4)
        ]
    elif input_source == "dataset":
        # training: 8 batches of varied shapes (the real stream), so the median is typical
        batches = dataset_batches(cfg, is_train, batch_size, count=8 if is_train else 4)
    else:
        raise ValueError(f"--input must be 'synthetic' or 'dataset', got {input_source!r}.")
    sizes = [tuple(x["image"].shape[-2:]) for batch in batches for x in batch]
    shapes = dict(
        batch_size=batch_size,
        image_size=list(image_size) if image_size else None,
        mean_image_hw=[
            float(np.mean([s[0] for s in sizes])),
            float(np.mean([s[1] for s in sizes])),
        ],
    )
    model = build_model(cfg)
    if not is_train:
        model = inference_model(model.eval(), cfg)
    return model, batches, shapes


def time_interleaved(
    calls: dict[str, Callable[[], object]], warmup: int, iters: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each call per round: ``warmup`` untimed calls of each first, then ``iters``
    rounds that time one call of each, in an order that rotates by round, so a machine that
    speeds up or slows down (other processes, clocks; up to 25 % within minutes on shared
    2-core machines) affects every call alike."""
    labels = list(calls)
    for label in labels:
        for _ in range(warmup):
            calls[label]()
    _synchronize(device)
    times = {label: [] for label in labels}
    for round_index in tqdm(range(iters), desc="interleaved rounds", leave=False, disable=None):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            calls[label]()
            _synchronize(device)
            times[label].append(time.perf_counter() - start)
    return times


def summarize_interleaved(
    times: dict[str, list[float]], items_per_call: dict[str, int] | int
) -> dict[str, dict]:
    """:func:`summarize_times` of each label's rounds, plus the median and quartiles of its
    per-round ratio to the first label's time: the number that resolves a 10 % change where
    separate runs cannot."""
    labels = list(times)
    base = np.asarray(times[labels[0]])
    summaries = {}
    for label in labels:
        items = items_per_call[label] if isinstance(items_per_call, dict) else items_per_call
        summary = summarize_times(times[label], items, "images")
        summary.pop("warmup_seconds")  # time_calls' attribute, not these rounds'
        ratios = np.asarray(times[label]) / base
        summary.update(
            ratio_to_first_median=float(np.median(ratios)),
            ratio_to_first_p25=float(np.percentile(ratios, 25)),
            ratio_to_first_p75=float(np.percentile(ratios, 75)),
        )
        summaries[label] = summary
    return summaries


def compare_interleaved(
    variants: dict[str, CfgNode],
    task: str,
    *,
    build_model: Callable[[CfgNode], torch.nn.Module],
    input_source: str = "synthetic",
    batch_size: int | None = None,
    image_size: tuple[int, int] | None = None,
    warmup: int = 2,
    iters: int = 10,
) -> dict:
    """Configs side by side in one process, timed round by round (:func:`time_interleaved`);
    each variant's speed is also given as its per-round ratio to the first variant
    (:func:`summarize_interleaved`).

    Each variant builds its model and batches from its own config (the same batches when the
    variants do not change the data)."""
    if task not in ("train", "inference"):
        raise ValueError(
            f"Interleaved comparison measures the train and inference tasks, not {task!r}."
        )
    is_train = task == "train"
    labels = list(variants)
    calls, storages, records = {}, {}, {}
    for label, cfg in variants.items():
        model, batches, shapes = prepare_model_and_batches(
            cfg, is_train, build_model, input_source, batch_size, image_size
        )
        if is_train:
            calls[label], storages[label] = train_call(cfg, model, batches)
        else:
            calls[label] = inference_call(model, batches)
        records[label] = {**shapes, "items_per_call": len(batches[0])}
    device = torch.device(next(iter(variants.values())).MODEL.DEVICE)
    times = time_interleaved(calls, warmup, iters, device)
    items = {label: records[label].pop("items_per_call") for label in labels}
    for label, summary in summarize_interleaved(times, items).items():
        records[label].update(summary)
        if is_train:
            records[label]["total_loss_first_last"] = first_last_loss(storages[label])
    first = next(iter(variants.values()))
    return {
        "task": task,
        "mode": "interleaved",
        **environment_record(first),
        "input": input_source,
        "variants": records,
        **memory_record(device),
    }


def comparison_table(record: dict) -> str:
    """An interleaved comparison as markdown: one row per variant, ratios to the first."""
    rows = [
        "| variant | median s | p25-p75 s | ratio to first (median of rounds) | p25-p75 |",
        "|---|---|---|---|---|",
    ]
    for label, r in record["variants"].items():
        rows.append(
            f"| {label} | {r['seconds_median']:.4g} | {r['seconds_p25']:.3f}-{r['seconds_p75']:.3f} "
            f"| {r['ratio_to_first_median']:.3f} | {r['ratio_to_first_p25']:.3f}-"
            f"{r['ratio_to_first_p75']:.3f} |"
        )
    return "\n".join(rows)


def markdown_table(records: list[dict]) -> str:
    """Benchmark records side by side (one row each), as in docs/benchmarks.md."""
    header = (
        "| record | task | input (batch x HxW) | precision | fold BN | channels-last | threads "
        "| median s | p25-p75 s | images/s | s / image | peak RSS MiB | CPU, date |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        if r["task"] == "data":
            mapper, loader = r["mapper_one_worker"], r["loader"]
            median, quartiles = (
                mapper["seconds_median"],
                f"{mapper['seconds_p25']:.4f}-{mapper['seconds_p75']:.4f}",
            )
            rate = f"{mapper['images_per_second']:.1f} (1 worker); {loader['images_per_second']:.1f} (loader, {loader['num_workers']} workers)"
            per_image = f"{1.0 / mapper['images_per_second']:.3g}"
            shape = "train mapper"
        else:
            median, quartiles = (
                r["seconds_median"],
                f"{r['seconds_p25']:.3f}-{r['seconds_p75']:.3f}",
            )
            rate = f"{r['images_per_second']:.2f}"
            per_image = f"{1.0 / r['images_per_second']:.3g}"
            if r["task"] == "eval":
                shape = f"{r['images']} images ({r.get('coco_eval_backend', 'pycocotools')})"
            else:
                h, w = r["mean_image_hw"]
                shape = f"{r['batch_size']} x {h:.0f}x{w:.0f} ({r['input']})"
        precision = r["train_precision"] if r["task"] == "train" else r["test_precision"]
        fold = (
            "-" if r["task"] in ("train", "data") else ("yes" if r.get("fold_batchnorm") else "no")
        )
        memory = r.get("peak_rss_mib", r.get("peak_gpu_allocated_mib", float("nan")))
        rows.append(
            f"| {r.get('label') or '-'} | {r['task']} | {shape} | {precision} | "
            f"{fold} | {'yes' if r.get('channels_last') else 'no'} | "
            f"{r['torch_threads']} | {median:.4g} | {quartiles} | {rate} | {per_image} | "
            f"{memory:.0f} | {r.get('device_name', '?')}, {r.get('date', '?')} |"
        )
    return "\n".join(rows)
