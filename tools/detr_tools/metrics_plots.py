"""Curves of a training run from Detectron2's ``OUTPUT_DIR/metrics.json`` (used by
``tools/plot_metrics.py``): losses (final decoder layer vs auxiliary layers), each loss term,
LR, class and cardinality errors, and each evaluation task's metrics. A resumed run repeats
iterations: the later value wins. Matplotlib is imported here only.
"""

import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend is ever needed

logger = logging.getLogger(__name__)

Series = dict[str, dict[int, float]]  # key -> {iteration: value}

# loss terms of DETR's criterion; auxiliary decoder layers carry the suffix _0, _1, ...
LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")
AUX_SUFFIX = re.compile(r"^(?P<term>loss_[a-z]+)_(?P<layer>\d+)$")
# the headline numbers of each evaluation task, drawn in the first panel; the rest in the second
EVAL_MAIN = {
    "bbox": ("AP", "AP50", "AP75"),
    "segm": ("AP", "AP50", "AP75"),
    "panoptic_seg": ("PQ", "SQ", "RQ"),
    "sem_seg": ("mIoU", "fwIoU", "mACC", "pACC"),
}
EVAL_DETAIL = {
    "bbox": ("APs", "APm", "APl"),
    "segm": ("APs", "APm", "APl"),
    "panoptic_seg": ("PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"),
}


def read_metrics(path: Path) -> Series:
    """Every numeric key of every row as ``{key: {iteration: value}}``.

    Detectron2 appends one json dict per line; evaluation results arrive as separate rows at the
    iteration they were computed. A resumed run writes iterations again: a repeated
    (key, iteration) keeps the later row's value, and the log says how many were replaced.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (is OUTPUT_DIR right? Detectron2 writes metrics.json there)"
        )
    series: Series = defaultdict(dict)
    rows = replaced = skipped = 0
    restarts: list[tuple[int, int]] = []
    last_iteration = -1
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:  # e.g. a line cut short by a killed run
                logger.warning(f"{path}:{number}: not json ({e}); line skipped")
                skipped += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
                skipped += 1
                continue
            rows += 1
            iteration = row["iteration"]
            if iteration < last_iteration:
                restarts.append((last_iteration, iteration))
            last_iteration = iteration
            for key, value in row.items():
                if (
                    key == "iteration"
                    or isinstance(value, bool)
                    or not isinstance(value, (int, float))
                ):
                    continue
                replaced += iteration in series[key]
                series[key][iteration] = float(value)
    if rows == 0:
        raise ValueError(
            f"{path} holds no metrics rows (json dicts with an 'iteration'): nothing to plot"
        )
    if skipped:
        logger.warning(f"{path}: {skipped} line(s) without an iteration skipped")
    if restarts:
        spans = ", ".join(f"back from {a} to {b}" for a, b in restarts)
        logger.info(
            f"{path} repeats iterations (a resumed run: {spans}): kept the later run's values "
            f"for {replaced} repeated (metric, iteration) pair(s)."
        )
    first = min(min(points) for points in series.values())
    last = max(max(points) for points in series.values())
    logger.info(f"Read {rows} rows, {len(series)} metrics, iterations {first}..{last} from {path}")
    return dict(series)


def _xy(points: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    iterations = sorted(points)
    return np.array(iterations), np.array([points[i] for i in iterations])


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average that ignores NaN (the first points average what they have)."""
    if window <= 1 or len(values) < 2:
        return values
    valid = np.isfinite(values)
    sums = np.cumsum(np.where(valid, values, 0.0))
    counts = np.cumsum(valid)
    start = np.maximum(np.arange(len(values)) - window, -1)
    window_sums = sums - np.where(start >= 0, sums[np.maximum(start, 0)], 0.0)
    window_counts = counts - np.where(start >= 0, counts[np.maximum(start, 0)], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(window_counts > 0, window_sums / np.maximum(window_counts, 1), np.nan)


def _line(ax, points: dict[int, float], label: str, smooth: int, **style) -> None:
    x, y = _xy(points)
    if smooth > 1 and len(y) > smooth:
        line = ax.plot(x, y, alpha=0.25, linewidth=0.8, color=style.get("color"))[0]
        style.setdefault("color", line.get_color())
        y = _smooth(y, smooth)
    style.setdefault("marker", "o" if len(x) < 3 else None)  # a line of one point is invisible
    ax.plot(x, y, label=label, **style)


def _new_figure(panels: int = 1, columns: int | None = None) -> tuple[Figure, list]:
    columns = columns or panels
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(6.0 * columns, 3.8 * rows), dpi=100)
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_axis_off()
    for ax in axes[:panels]:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("iteration")
    return fig, axes[:panels]


def _save(fig: Figure, output_dir: Path, name: str, written: list[Path]) -> None:
    fig.tight_layout()
    path = output_dir / name
    fig.savefig(path)
    written.append(path)


def _skip(name: str, reason: str) -> None:
    logger.info(f"Skipping {name}: {reason}")


def _aux_layers(series: Series, term: str) -> dict[int, dict[int, float]]:
    layers = {}
    for key, points in series.items():
        match = AUX_SUFFIX.match(key)
        if match and match["term"] == term:
            layers[int(match["layer"])] = points
    return dict(sorted(layers.items()))


def _sum_series(parts: Sequence[dict[int, float]]) -> dict[int, float]:
    """Sum at the iterations every part has (Detectron2 logs all loss terms in the same rows)."""
    if not parts:
        return {}
    common = set(parts[0]).intersection(*parts[1:])
    return {i: sum(p[i] for p in parts) for i in sorted(common)}


def plot_losses(series: Series, output_dir: Path, smooth: int, written: list[Path]) -> None:
    final = [series[t] for t in LOSS_TERMS if t in series]
    aux = [points for t in LOSS_TERMS for points in _aux_layers(series, t).values()]
    if "total_loss" not in series and not final:
        return _skip("losses.png", "no total_loss or loss_* keys")
    fig, (ax,) = _new_figure()
    if "total_loss" in series:
        _line(ax, series["total_loss"], "total_loss", smooth, color="black", linewidth=1.8)
    if final:
        _line(
            ax,
            _sum_series(final),
            "final decoder layer (sum of its terms)",
            smooth,
            color="tab:blue",
        )
    if aux:
        _line(ax, _sum_series(aux), "auxiliary decoder layers (sum)", smooth, color="tab:orange")
    ax.set_title("training loss (weighted, as summed for the gradient)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    _save(fig, output_dir, "losses.png", written)


def plot_loss_terms(series: Series, output_dir: Path, smooth: int, written: list[Path]) -> None:
    terms = [t for t in LOSS_TERMS if t in series or _aux_layers(series, t)]
    if not terms:
        return _skip("loss_terms.png", "no loss_* keys")
    fig, axes = _new_figure(len(terms), columns=min(len(terms), 3))
    for ax, term in zip(axes, terms):
        aux = _aux_layers(series, term)
        shades = np.linspace(0.35, 0.8, len(aux)) if len(aux) > 1 else [0.6]  # darker = later
        colors = matplotlib.colormaps["Blues"](shades)
        for color, (layer, points) in zip(colors, aux.items()):
            _line(ax, points, f"aux layer {layer}", smooth, color=color, linewidth=0.9)
        if term in series:
            _line(ax, series[term], "final layer", smooth, color="tab:red", linewidth=1.8)
        ax.set_title(term)
        ax.legend(fontsize=7)
    _save(fig, output_dir, "loss_terms.png", written)


def plot_single(
    series: Series, key: str, output_dir: Path, smooth: int, written: list[Path], ylabel: str
) -> None:
    name = f"{key}.png"
    if key not in series:
        return _skip(name, f"no {key!r} key")
    fig, (ax,) = _new_figure()
    _line(ax, series[key], key, smooth, color="tab:blue")
    ax.set_title(key)
    ax.set_ylabel(ylabel)
    _save(fig, output_dir, name, written)


def plot_lr(series: Series, output_dir: Path, written: list[Path]) -> None:
    if "lr" not in series:
        return _skip("lr.png", "no 'lr' key")
    fig, (ax,) = _new_figure()
    _line(ax, series["lr"], "lr", 1, color="tab:green")
    values = np.array(list(series["lr"].values()))
    positive = values[values > 0]
    if len(positive) and positive.max() / positive.min() > 50:  # drops of 10x read better in log
        ax.set_yscale("log")
    ax.set_title("learning rate")
    ax.set_ylabel("lr")
    _save(fig, output_dir, "lr.png", written)


def plot_evaluation(series: Series, output_dir: Path, written: list[Path]) -> None:
    tasks: dict[str, dict[str, dict[int, float]]] = defaultdict(dict)
    for key, points in series.items():
        if "/" in key:
            task, metric = key.split("/", 1)
            tasks[task][metric] = points
    if not tasks:
        return _skip("eval_*.png", "no evaluation results (keys like 'bbox/AP')")
    for task, metrics in sorted(tasks.items()):
        main = [m for m in EVAL_MAIN.get(task, ()) if m in metrics]
        detail = [m for m in EVAL_DETAIL.get(task, ()) if m in metrics]
        if not main:  # an unknown task: its overall metrics (not per-class "AP-<class>")
            main = sorted(m for m in metrics if "-" not in m and m not in detail)
        per_class = [m for m in metrics if m not in main and m not in detail]
        if per_class:
            example = per_class[0]
            logger.info(
                f"eval_{task}.png: {len(per_class)} per-class metrics not drawn (e.g. {example})"
            )
        fig, axes = _new_figure(2 if detail else 1)
        for metric in main:
            _line(axes[0], metrics[metric], metric, 1, marker="o", markersize=4)
        axes[0].set_title(f"{task} evaluation")
        for metric in detail:
            _line(axes[1], metrics[metric], metric, 1, marker="o", markersize=4)
        if detail:
            axes[1].set_title(
                f"{task} by object size" if task in ("bbox", "segm") else f"{task}: things / stuff"
            )
        for ax in axes:
            ax.legend(fontsize=8)
        _save(fig, output_dir, f"eval_{task}.png", written)


def plot_metrics(metrics_file: Path, output_dir: Path, smooth: int = 1) -> list[Path]:
    """Write every picture the file has keys for; returns the files written."""
    series = read_metrics(metrics_file)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plot_losses(series, output_dir, smooth, written)
    plot_loss_terms(series, output_dir, smooth, written)
    plot_lr(series, output_dir, written)
    plot_single(series, "class_error", output_dir, smooth, written, "class error (%)")
    plot_single(
        series,
        "cardinality_error",
        output_dir,
        smooth,
        written,
        "|#predicted objects - #true objects|",
    )
    plot_evaluation(series, output_dir, written)
    return written
