"""Convergence experiments: train config variants side by side, with several seeds, and report AP
against iterations and wall-clock time (``tools/convergence.py``; results in
``docs/convergence.md``).

An experiment is a JSON spec::

    {"config": "configs/detr_face_sample.yaml",     # the common base
     "overrides": ["TEST.EVAL_PERIOD", "250", ...],  # for every run (eval sets, schedule)
     "eval_sets": ["face_heldout", "face_sample_val"],
     "seeds": [1, 2],
     "variants": {"plain": [], "groups": ["MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS", "13"], ...},
     "pretrain": {"config": ..., "overrides": [...], "seed": 1},  # optional
     "metrics": ["panoptic_seg/PQ", "segm/AP"]}  # optional, default box AP50 and AP

With ``pretrain`` (the transfer experiment), that one run trains first, in ``OUT/pretrain``, and
every variant starts from its ``model_final.pth`` (``MODEL.WEIGHTS``, before the variant's own
overrides, so a variant can set ``MODEL.WEIGHTS ""`` to train from scratch instead).

``metrics`` are Detectron2's keys of the evaluation results (``bbox/AP50``, ``segm/AP``,
``panoptic_seg/PQ``, ...); the first one is plotted. Box metrics are labelled without ``bbox/``.

Each (variant, seed) trains in its own ``tools/train_net.py`` process with ``threads`` CPU
threads (several runs share the machine, so a run's own timings are not trusted), and leaves
Detectron2's ``metrics.json`` in ``OUT/variant/seed_S``. Wall-clock axes use the seconds per
iteration of each variant measured on an otherwise idle machine (``measure_speed``: the
benchmark tool's train task, all variants interleaved in one process), so curves do not depend
on what else ran at the same time.
"""

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_METRICS = ("bbox/AP50", "bbox/AP")


def spec_metrics(spec: dict) -> list[str]:
    return list(spec.get("metrics", DEFAULT_METRICS))


def metric_label(metric: str) -> str:
    """``bbox/AP50`` -> ``AP50``; other tasks keep their prefix (``segm/AP``)."""
    return metric.removeprefix("bbox/")


def load_spec(path: str) -> dict:
    with open(path) as f:
        spec = json.load(f)
    missing = [k for k in ("config", "variants", "seeds", "eval_sets") if k not in spec]
    if missing:
        raise ValueError(f"Experiment spec {path} lacks {missing}.")
    return spec


def run_dir(out_dir: str, variant: str, seed: int) -> Path:
    return Path(out_dir) / variant / f"seed_{seed}"


def pretrain_dir(out_dir: str) -> Path:
    return Path(out_dir) / "pretrain"


def _train_net(config: str, overrides: Sequence[str], seed: int, output_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "tools" / "train_net.py"),
        "--resume",  # an interrupted run continues from its last checkpoint (exactly)
        "--config-file",
        config,
        *overrides,
        "SEED",
        str(seed),
        "OUTPUT_DIR",
        str(output_dir),
    ]


def pretrain_command(spec: dict, out_dir: str) -> list[str]:
    """The ``tools/train_net.py`` command line of the spec's ``pretrain`` run."""
    pretrain = spec["pretrain"]
    return _train_net(
        pretrain["config"],
        pretrain.get("overrides", []),
        pretrain.get("seed", 1),
        pretrain_dir(out_dir),
    )


def train_command(spec: dict, variant: str, seed: int, out_dir: str) -> list[str]:
    """The ``tools/train_net.py`` command line of one run."""
    if variant not in spec["variants"]:
        raise KeyError(f"Unknown variant {variant!r}; the spec has {sorted(spec['variants'])}.")
    weights = []
    if "pretrain" in spec:
        weights = ["MODEL.WEIGHTS", str(pretrain_dir(out_dir) / "model_final.pth")]
    overrides = [*spec.get("overrides", []), *weights, *spec["variants"][variant]]
    return _train_net(spec["config"], overrides, seed, run_dir(out_dir, variant, seed))


def starts_from_pretrain(spec: dict, variant: str) -> bool:
    """Whether ``variant`` loads the spec's pretrain run: it has one and the variant does not
    set ``MODEL.WEIGHTS`` itself (e.g. a from-scratch row), which needs no pretraining."""
    return "pretrain" in spec and "MODEL.WEIGHTS" not in spec["variants"][variant][::2]


def _run_pretrain(spec: dict, out_dir: str, threads: int) -> None:
    """Train the spec's ``pretrain`` run (all threads of the experiment) unless it finished."""
    path = pretrain_dir(out_dir)
    if _finished(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = pretrain_command(spec, out_dir)
    logger.info(f"Pretraining: {' '.join(command[1:])}")
    with open(path / "train.log", "w") as log:
        code = subprocess.call(command, env=env, stdout=log, stderr=log, cwd=REPO)
    if code != 0:
        raise RuntimeError(f"The pretrain run failed (exit {code}); see {path / 'train.log'}")


def _finished(path: Path) -> bool:
    return (path / "model_final.pth").exists()


def run_experiment(
    spec: dict,
    out_dir: str,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    parallel: int = 2,
    threads: int = 1,
) -> None:
    """Train every (variant, seed) not finished yet, ``parallel`` processes at a time (after
    the spec's ``pretrain`` run, if one of them starts from it)."""
    todo = [
        (v, s)
        for v in (variants or list(spec["variants"]))
        for s in (seeds or spec["seeds"])
        if not _finished(run_dir(out_dir, v, s))
    ]
    if any(starts_from_pretrain(spec, v) for v, _ in todo):
        _run_pretrain(spec, out_dir, threads * parallel)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running: list = []
    progress = tqdm(total=len(todo), desc="runs", disable=None)
    while todo or running:
        while todo and len(running) < parallel:
            variant, seed = todo.pop(0)
            path = run_dir(out_dir, variant, seed)
            path.mkdir(parents=True, exist_ok=True)
            log = open(path / "train.log", "w")
            command = train_command(spec, variant, seed, out_dir)
            logger.info(f"Starting {variant} seed {seed}: {' '.join(command[1:])}")
            running.append(
                (
                    variant,
                    seed,
                    subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=REPO),
                    log,
                )
            )
        time.sleep(2)
        for item in list(running):
            variant, seed, process, log = item
            if process.poll() is None:
                continue
            log.close()
            running.remove(item)
            progress.update(1)
            if process.returncode != 0:
                logger.error(
                    f"{variant} seed {seed} failed (exit {process.returncode}); see {log.name}"
                )
    progress.close()


def read_curve(
    path: Path, eval_sets: Sequence[str], metrics: Sequence[str] = DEFAULT_METRICS
) -> dict[str, list[float]]:
    """``iteration`` and ``<set>/<label>`` of every metric (:func:`metric_label`: ``<set>/AP50``
    for ``bbox/AP50``) at every evaluation of one run, from Detectron2's ``metrics.json`` (one
    JSON object per line). With one test set Detectron2 writes ``bbox/AP`` without the set name.
    The iteration of an evaluation is the number of steps trained before it: a periodic evaluation is written at the iteration of the step it
    follows (+1), the final one in a row of its own at ``MAX_ITER``, one past the last step's
    row (as is)."""
    records = [json.loads(line) for line in open(path / "metrics.json")]
    curve: dict[str, list[float]] = {"iteration": []}
    last_step = None
    for record in records:
        if "total_loss" in record:
            last_step = record["iteration"]
        prefixes = [f"{s}/" for s in eval_sets] if len(eval_sets) > 1 else [""]
        if not all(p + m in record for p in prefixes for m in metrics):
            continue
        final = "total_loss" not in record and last_step == record["iteration"] - 1
        steps = record["iteration"] if final else record["iteration"] + 1
        curve["iteration"].append(steps)
        for name in eval_sets:
            prefix = f"{name}/" if len(eval_sets) > 1 else ""
            for metric in metrics:
                curve.setdefault(f"{name}/{metric_label(metric)}", []).append(
                    record[prefix + metric]
                )
    return curve


def collect(spec: dict, out_dir: str) -> dict[str, dict[int, dict[str, list[float]]]]:
    """variant -> seed -> curve, for the finished runs."""
    results: dict[str, dict[int, dict]] = {}
    for variant in spec["variants"]:
        for seed in spec["seeds"]:
            path = run_dir(out_dir, variant, seed)
            if (path / "metrics.json").exists():
                curve = read_curve(path, spec["eval_sets"], spec_metrics(spec))
                if curve["iteration"]:
                    results.setdefault(variant, {})[seed] = curve
    return results


def speed_command(
    spec: dict, baseline: str, others: Sequence[str], iters: int, output: str
) -> list[str]:
    """The benchmark command of :func:`measure_speed`: the baseline as the config, every other
    variant as a ``--compare`` on top of it."""
    command = [
        sys.executable,
        str(REPO / "tools" / "benchmark.py"),
        "--config-file",
        spec["config"],
        "--task",
        "train",
        "--input",
        "dataset",
        "--iters",
        str(iters),
        "--warmup",
        "3",
        "--output",
        output,
    ]
    for variant in others:
        command += ["--compare", variant, shlex.join(spec["variants"][variant])]
    return command + [*spec.get("overrides", []), *spec["variants"][baseline]]


def speeds_from_comparison(record: dict, baseline: str, others: Sequence[str]) -> dict:
    """Seconds per iteration from an interleaved comparison record: the baseline's median, and
    each other variant's median per-round ratio to it times that median."""
    base_seconds = record["variants"]["base"]["seconds_median"]
    speeds = {baseline: base_seconds}
    for variant in others:
        speeds[variant] = base_seconds * record["variants"][variant]["ratio_to_first_median"]
    return speeds


def measure_speed(
    spec: dict, variants: Sequence[str], iters: int = 30, baseline: str | None = None
) -> dict[str, float]:
    """Seconds per training iteration of each variant on its real batches (all the machine's
    threads), measured in one benchmark process with the variants' steps interleaved
    (``tools/benchmark.py --compare``). Separate runs differ by up to 25 % on a shared 2-core
    machine; interleaved steps see the same machine state. Each variant's overrides apply on
    top of the spec's and the baseline's. A baseline of the spec is timed even where it is not
    among ``variants`` (it needs only its config), so that overheads refer to it."""
    if baseline not in spec["variants"]:
        baseline = variants[0]
    others = [v for v in variants if v != baseline]
    output = Path("/tmp") / f"convergence_speed_{os.getpid()}.json"
    subprocess.run(
        speed_command(spec, baseline, others, iters, str(output)),
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    speeds = speeds_from_comparison(json.loads(output.read_text()), baseline, others)
    for variant, seconds in speeds.items():
        logger.info(f"{variant}: {seconds:.3f} s/iteration")
    return speeds


def _mean_curve(curves: dict[int, dict], key: str):
    """Every iteration any seed evaluated, the mean of ``key`` over the seeds that reached it,
    and those seeds' values (runs still going or stopped early count where they got to)."""
    iterations = sorted({i for c in curves.values() for i in c["iteration"]})
    values = [
        [c[key][c["iteration"].index(i)] for c in curves.values() if i in c["iteration"]]
        for i in iterations
    ]
    return iterations, [float(np.mean(v)) for v in values], values


def markdown_report(spec: dict, results: dict, speeds: dict[str, float], baseline: str) -> str:
    """Tables: per variant, seconds per iteration (and overhead vs ``baseline``), and each metric
    (default AP50, AP) of every eval set at every evaluated iteration (mean over seeds, seeds in
    brackets)."""
    lines = ["| variant | s/iteration | overhead vs " + baseline + " |", "|---|---|---|"]
    for variant in results:
        if variant in speeds:
            overhead = (
                f"{100 * (speeds[variant] / speeds[baseline] - 1):+.0f} %"
                if baseline in speeds
                else "—"
            )
            lines.append(f"| {variant} | {speeds[variant]:.3f} | {overhead} |")
    # columns: every evaluated iteration of any variant (schedules may differ), "-" where a
    # variant was not evaluated
    iterations = sorted(
        {i for curves in results.values() for c in curves.values() for i in c["iteration"]}
    )
    for name in spec["eval_sets"]:
        for metric in map(metric_label, spec_metrics(spec)):
            key = f"{name}/{metric}"
            lines += ["", f"**{metric} on `{name}`** (mean over seeds; per seed in brackets)", ""]
            header = "| variant | " + " | ".join(str(i) for i in iterations) + " |"
            lines += [header, "|---" * (len(iterations) + 1) + "|"]
            for variant, curves in results.items():
                its, mean, values = _mean_curve(curves, key)
                cell_at = {
                    it: f"{m:.1f} ({'/'.join(f'{v:.1f}' for v in seed_values)})"
                    for it, m, seed_values in zip(its, mean, values)
                }
                cells = [cell_at.get(i, "-") for i in iterations]
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def first_reaching(curves: dict[int, dict], key: str, threshold: float) -> dict[int, int | None]:
    """Per seed, the first evaluated iteration where ``key`` (e.g. ``face_heldout/AP50``) is at
    least ``threshold``; ``None`` where the run never got there."""
    return {
        seed: next((i for i, v in zip(c["iteration"], c[key]) if v >= threshold), None)
        for seed, c in curves.items()
    }


def reaching_table(spec: dict, results: dict, threshold: float) -> str:
    """Markdown: the iteration at which each variant's runs first reached ``threshold`` of the
    first metric on the first eval set ("-": not within the run)."""
    key = f"{spec['eval_sets'][0]}/{metric_label(spec_metrics(spec)[0])}"
    lines = [
        f"**First evaluation with {key} >= {threshold:g}** (per seed)",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in spec["seeds"]) + " |",
        "|---" * (len(spec["seeds"]) + 1) + "|",
    ]
    for variant, curves in results.items():
        reached = first_reaching(curves, key, threshold)
        cells = [str(reached.get(s) or "-") if s in reached else "not run" for s in spec["seeds"]]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pretrain_summary(spec: dict, out_dir: str) -> str:
    """Markdown lines with the box AP50 / AP of the spec's pretrain run at each evaluation, or
    "" without a pretrain run."""
    path = pretrain_dir(out_dir)
    if "pretrain" not in spec or not (path / "metrics.json").exists():
        return ""
    curve = read_curve(path, ["pretrain"], ["bbox/AP50", "bbox/AP"])  # its one test set
    cells = [
        f"{i}: {ap50:.1f} / {ap:.1f}"
        for i, ap50, ap in zip(curve["iteration"], curve["pretrain/AP50"], curve["pretrain/AP"])
    ]
    return (
        "**Pretraining** (the spec's pretrain run; box AP50 / AP on its test set at each "
        "evaluation): " + ", ".join(cells) + "\n"
    )


def final_weights_ap(run: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Box AP50/AP on the run's test sets of a finished run's final weights: ``"model"`` (the
    checkpoint's model: the EMA when ``SOLVER.EMA`` was on) and, for EMA runs, ``"training"``
    (the raw weights the trainer state keeps). Training does not depend on the EMA, so the second
    is what the same run gives without it."""
    from detectron2.config import get_cfg

    from detr_d2 import add_detr_config
    from detr_d2.checkpoint import safe_torch_load
    from detr_d2.config import merge_detr_config_file
    from detr_d2.data import register_datasets_from_cfg
    from detr_d2.engine import DetrTrainer, resolve_class_layout

    cfg = get_cfg()
    add_detr_config(cfg)
    merge_detr_config_file(cfg, str(run / "config.yaml"))
    register_datasets_from_cfg(cfg)
    resolve_class_layout(cfg)
    checkpoint = safe_torch_load(str(run / "model_final.pth"))
    weights = {"model": checkpoint["model"]}
    ema_state = checkpoint.get("trainer", {}).get("hooks", {}).get("EMAHook")
    if ema_state is not None:
        weights["training"] = ema_state["train_weights"]
    model = DetrTrainer.build_model(cfg)
    scores = {}
    for name, state in weights.items():
        model.load_state_dict(state)
        results = DetrTrainer.test(cfg, model)
        if len(cfg.DATASETS.TEST) == 1:
            results = {cfg.DATASETS.TEST[0]: results}
        scores[name] = {
            test_set: {k: r["bbox"][k] for k in ("AP50", "AP")} for test_set, r in results.items()
        }
    return scores


def plot_curves(
    spec: dict, results: dict, speeds: dict[str, float], eval_set: str, path: str
) -> None:
    """PNG: the spec's first metric (default AP50) on ``eval_set`` against iterations and against
    minutes (mean over seeds, the seeds' range shaded)."""
    label = metric_label(spec_metrics(spec)[0])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.cm.tab20.colors  # distinct up to 20 variants (the default cycle has 10)
    for index, (variant, curves) in enumerate(results.items()):
        iterations, mean, values = _mean_curve(curves, f"{eval_set}/{label}")
        iterations = np.array(iterations)
        for axis, x in (
            (axes[0], iterations),
            (axes[1], iterations * speeds.get(variant, np.nan) / 60),
        ):
            (line,) = axis.plot(
                x, mean, marker="o", markersize=3, label=variant, color=colours[index % 20]
            )
            low, high = [min(v) for v in values], [max(v) for v in values]
            axis.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training minutes on this machine (s/iteration measured alone)")
    for axis in axes:
        axis.set_ylabel(f"{label} on {eval_set}")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
