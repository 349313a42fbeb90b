"""Matplotlib figures of DETR's attention maps (used by ``tools/visualize_attention.py``).

Every function takes an RGB uint8 image [H, W, 3] and maps already aligned with it (see
:func:`detr_d2.attention.attention_to_image`), and returns a ``Figure`` the caller saves and
closes. Matplotlib is imported here only, so the library does not need it to train.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from matplotlib import patches
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from mpl_toolkits.axes_grid1 import make_axes_locatable

__all__ = [
    "Detection",
    "EncoderPoint",
    "decoder_attention_figure",
    "encoder_attention_figure",
    "summary_figure",
]

# Perceptually uniform and dark at zero: low attention darkens the image, high glows.
HEAT_CMAP = "inferno"
BOX_COLORS = (
    "#00e5ff",
    "#76ff03",
    "#ff4081",
    "#ffea00",
    "#e040fb",
    "#ff9100",
    "#18ffff",
    "#b2ff59",
)


class Detection(NamedTuple):
    """One object query shown in the figures."""

    query: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # xyxy pixels of the shown image
    name: str  # "det03" (above the score threshold) or "top01" (fallback)


class EncoderPoint(NamedTuple):
    """One reference pixel of the encoder self-attention figures."""

    x: float  # pixels of the shown image
    y: float
    name: str  # e.g. "x120_y80" in original pixel coordinates
    token: int  # the feature-map token under the point (row-major index)


def _figure(panels: int, image_hw: tuple[int, int], panel_width: float = 5.0) -> Figure:
    height = panel_width * min(max(image_hw[0] / image_hw[1], 0.4), 2.5)
    return Figure(figsize=(panel_width * panels + 0.6 * panels, height + 0.8), dpi=100)


def _gray(image: np.ndarray) -> np.ndarray:
    """Luminance as RGB, so the colour in a heat overlay comes from the map only."""
    luminance = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(luminance[..., None], 3, axis=2).astype(np.uint8)


def _show(ax: Axes, image: np.ndarray) -> None:
    ax.imshow(image, interpolation="bilinear")
    ax.set_axis_off()
    # boxes are not clipped (as DETR's outputs): keep the frame on the image whatever is drawn
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_autoscale_on(False)


def _overlay(ax: Axes, image: np.ndarray, heat: np.ndarray, alpha: float = 0.65):
    """Gray image under the map. The colours span the map's own range, as the DETR notebooks
    draw them (a trained query's map is peaked, an untrained one nearly flat): the colour bar
    gives the actual weights."""
    assert heat.shape == image.shape[:2], (
        f"map {heat.shape} is not aligned with image {image.shape}"
    )
    _show(ax, _gray(image))
    return ax.imshow(heat, cmap=HEAT_CMAP, alpha=alpha)


def _colorbar(fig: Figure, ax: Axes, mappable) -> None:
    """A colour bar as tall as the image."""
    cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.06)
    bar = fig.colorbar(mappable, cax=cax)
    bar.set_label("attention weight", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _box(
    ax: Axes, box: Sequence[float], color: str, text: str | None = None, dashed: bool = False
) -> None:
    x0, y0, x1, y1 = box
    ax.add_patch(
        patches.Rectangle(
            (x0, y0),
            x1 - x0,
            y1 - y0,
            fill=False,
            edgecolor=color,
            linewidth=2,
            linestyle="--" if dashed else "-",
        )
    )
    if text:
        # the label sits on the box's top-left corner, moved inside the image when it is not
        right, bottom = ax.get_xlim()[1], ax.get_ylim()[0]
        ax.text(
            min(max(x0, 0), right),
            min(max(y0, 0), bottom),
            text,
            color="black",
            fontsize=8,
            va="bottom" if y0 > 12 else "top",
            clip_on=True,
            bbox={"facecolor": color, "alpha": 0.85, "pad": 1, "edgecolor": "none"},
        )


def _point(ax: Axes, point: EncoderPoint, size: float = 90) -> None:
    ax.scatter(
        [point.x], [point.y], s=size, c="#00e5ff", marker="o", edgecolors="black", linewidths=1.5
    )


def decoder_attention_figure(
    image: np.ndarray, heat: np.ndarray, detection: Detection, title: str
) -> Figure:
    """Left: the detection's box on the image. Right: its query's cross-attention on the image."""
    fig = _figure(2, image.shape[:2])
    left, right = fig.subplots(1, 2)
    _show(left, image)
    _box(left, detection.box, BOX_COLORS[0], f"{detection.label} {detection.score:.2f}")
    left.set_title(f"{detection.name}: query {detection.query}", fontsize=10)
    mappable = _overlay(right, image, heat)
    _box(right, detection.box, "white", dashed=True)
    right.set_title("decoder cross-attention", fontsize=10)
    _colorbar(fig, right, mappable)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def encoder_attention_figure(
    image: np.ndarray, heat: np.ndarray, point: EncoderPoint, title: str
) -> Figure:
    """The encoder self-attention of the token under ``point`` (marked), on the image."""
    fig = _figure(1, image.shape[:2], panel_width=6.0)
    ax = fig.subplots()
    _colorbar(fig, ax, _overlay(ax, image, heat))
    _point(ax, point)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def summary_figure(
    image: np.ndarray,
    detections: Sequence[Detection],
    decoder_heats: Sequence[np.ndarray],
    points: Sequence[EncoderPoint],
    encoder_heats: Sequence[np.ndarray],
    title: str,
    max_columns: int = 6,
) -> Figure:
    """One page: the image with detections and points, then up to ``max_columns`` decoder maps
    and encoder maps, each scaled to its own maximum."""
    columns = max(min(max(len(detections), len(points)), max_columns), 2)
    aspect = min(max(image.shape[0] / image.shape[1], 0.4), 2.5)
    cell = 2.6
    # the image at two cells' size on top, then one row of decoder and one of encoder maps
    fig = Figure(figsize=(cell * columns, cell * aspect * 4 + 1.2), dpi=100)
    grid = GridSpec(3, columns, figure=fig, height_ratios=[2, 1, 1])
    top = fig.add_subplot(grid[0, :])
    _show(top, image)
    for i, detection in enumerate(detections):
        color = BOX_COLORS[i % len(BOX_COLORS)]
        _box(top, detection.box, color, f"{detection.name} {detection.label} {detection.score:.2f}")
    for point in points:
        _point(top, point, size=60)
    if len(detections) > columns or len(points) > columns:
        title += f"\n(maps of the first {columns} detections and points)"
    top.set_title(title, fontsize=11)
    rows: list[tuple[str, Sequence, Sequence[np.ndarray]]] = [
        ("dec", detections, decoder_heats),
        ("enc", points, encoder_heats),
    ]
    for row, (kind, items, heats) in enumerate(rows, start=1):
        for column in range(columns):
            ax = fig.add_subplot(grid[row, column])
            ax.set_axis_off()
            if column >= len(items):
                continue
            _overlay(ax, image, heats[column])
            if kind == "dec":
                _box(ax, items[column].box, "white", dashed=True)
                ax.set_title(f"{items[column].name} {items[column].label}", fontsize=8)
            else:
                _point(ax, items[column], size=30)
                ax.set_title(f"enc {items[column].name}", fontsize=8)
    fig.tight_layout()
    return fig
