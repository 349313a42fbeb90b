"""Deterministic generator of a small synthetic one-class face detection dataset (COCO format).

Why: the CPU demo needs a detection task that DETR can learn from scratch in minutes, that ships
without any download, and that is byte-identical wherever it is generated (PNG images, one seeded
numpy generator per image, no global random state). The faces are cartoons (skin-tone ellipse,
eyes, mouth, optional hair, pose rotation) on varied non-skin backgrounds with clutter.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .generated import PARAMS_FILE, generate_splits_once

# Face, rgb, ellipse_points and SUPERSAMPLE are shared with the panoptic scene generator.
__all__ = [
    "generate_face_dataset",
    "render_image",
    "CATEGORIES",
    "GENERATOR_VERSION",
    "SUPERSAMPLE",
    "Face",
    "ellipse_points",
    "rgb",
]

logger = logging.getLogger(__name__)

# Bump when the drawing changes, so that existing outputs are regenerated instead of skipped.
GENERATOR_VERSION = 1
CATEGORIES = [{"id": 1, "name": "face", "supercategory": "person"}]
SPLITS = ("train", "val")

# Faces are drawn at SUPERSAMPLE x the final resolution and box-filtered down: antialiased edges.
SUPERSAMPLE = 3
MIN_SIDE, MAX_SIDE = 144, 224
MIN_FACE_HEIGHT, MAX_FACE_HEIGHT = 20.0, 90.0
# A face may stick out of the image by at most this many pixels (its box is clipped).
MAX_CUT = 3.0
# Every EMPTY_EVERY-th image has no face: exactly 5 % negatives, also in small splits.
EMPTY_EVERY = 20
# Probabilities of 1, 2, 3, 4 faces in a non-empty image.
FACE_COUNT_PROBS = (0.3, 0.3, 0.22, 0.18)
MAX_IOU = 0.1
# Also bound intersection / smaller area, so that a small face never hides inside a big one.
MAX_OVERLAP_OF_SMALLER = 0.15
PLACEMENT_TRIES = 30
ELLIPSE_POINTS = 64
OUTLINE_POINTS = 64

# Light to dark; every face jitters its tone a little.
SKIN_TONES = (
    (255, 226, 200),
    (250, 208, 178),
    (238, 192, 150),
    (226, 170, 120),
    (205, 145, 98),
    (178, 120, 78),
    (150, 96, 60),
    (120, 76, 46),
    (92, 58, 36),
    (70, 45, 30),
)
HAIR_COLOURS = (
    (20, 16, 14),
    (44, 30, 22),
    (70, 46, 28),
    (96, 62, 34),
    (120, 60, 30),
    (60, 60, 62),
    (150, 150, 150),
    (176, 140, 80),
)

Point = tuple[float, float]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def rgb(values: Sequence[float]) -> tuple[int, int, int]:
    """Clip to 0..255 ints (PIL wants plain ints)."""
    r, g, b = (int(min(255, max(0, round(float(v))))) for v in values)
    return r, g, b


def _non_skin_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A background/clutter colour never mistaken for skin: grey, or a hue far from orange."""
    if rng.random() < 0.25:
        sat = rng.uniform(0.0, 0.1)
        hue = rng.uniform(0.0, 1.0)
    else:
        sat = rng.uniform(0.25, 0.9)
        hue = rng.uniform(70.0, 300.0) / 360.0
    val = rng.uniform(0.15, 0.95)
    return rgb(255.0 * np.array(colorsys.hsv_to_rgb(hue, sat, val)))


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[int, int, int]:
    """Linear blend of two colours (t = weight of b)."""
    return rgb([(1.0 - t) * x + t * y for x, y in zip(a, b)])


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth gradient plus optional low-frequency blotches, float HxWx3 at the final size."""
    c0 = np.array(_non_skin_colour(rng), dtype=np.float64)
    c1 = np.array(_non_skin_colour(rng), dtype=np.float64)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    t = xs * math.cos(theta) + ys * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    t = t ** rng.uniform(0.6, 1.6)
    img = c0[None, None, :] * (1.0 - t[..., None]) + c1[None, None, :] * t[..., None]
    if rng.random() < 0.6:
        grid = int(rng.integers(3, 8))
        amp = rng.uniform(6.0, 22.0)
        for ch in range(3):
            coarse = rng.normal(0.0, amp, size=(grid, grid)).astype(np.float32)
            smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
            img[..., ch] += np.asarray(smooth, dtype=np.float64)
    return img


def _draw_clutter(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int
) -> None:
    """A few rectangles, lines and triangles in non-skin colours (nothing round or face-like)."""
    s = SUPERSAMPLE
    for _ in range(int(rng.integers(0, 7))):
        colour = _non_skin_colour(rng)
        kind = rng.integers(0, 3)
        if kind == 0:
            x0, x1 = sorted(rng.uniform(-0.1, 1.1, size=2) * width * s)
            y0, y1 = sorted(rng.uniform(-0.1, 1.1, size=2) * height * s)
            if rng.random() < 0.5:
                draw.rectangle([x0, y0, x1, y1], fill=colour)
            else:
                draw.rectangle([x0, y0, x1, y1], outline=colour, width=int(rng.integers(1, 4) * s))
        elif kind == 1:
            pts = rng.uniform(-0.1, 1.1, size=(2, 2)) * np.array([width, height]) * s
            draw.line([tuple(p) for p in pts], fill=colour, width=int(rng.integers(1, 5) * s))
        else:
            centre = rng.uniform(0.0, 1.0, size=2) * np.array([width, height])
            pts = (centre + rng.uniform(-30.0, 30.0, size=(3, 2))) * s
            draw.polygon([tuple(p) for p in pts], fill=colour)


def ellipse_points(
    cx: float, cy: float, rx: float, ry: float, n: int = ELLIPSE_POINTS
) -> np.ndarray:
    """Polygon (n x 2) of an axis-aligned ellipse in face-local coordinates."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


class Face:
    """Random cartoon-face parameters in face-local coordinates (origin = head centre, y down).

    Everything is kept as polygons so that the drawn pixels, the tight box and the segmentation
    polygon all come from the same points.
    """

    def __init__(self, rng: np.random.Generator, height: float) -> None:
        r = rng.random()
        ratio = rng.uniform(1.3, 1.5) if r < 0.3 else rng.uniform(1.05, 1.28)
        self.has_hair = bool(rng.random() < 0.7)
        hair_top = rng.uniform(1.08, 1.22) if self.has_hair else 1.0
        # The box height is about ry * (1 + hair_top); solve for ry.
        self.ry = height / (1.0 + hair_top)
        self.rx = self.ry / ratio
        self.hair_x = rng.uniform(1.05, 1.15)
        self.hair_y = hair_top
        self.hair_side = rng.uniform(0.0, 0.45)  # radians below the equator the hair reaches
        self.hairline = rng.uniform(0.42, 0.68)
        large_pose = rng.random() < 0.6
        limit = 25.0 if large_pose else 5.0
        self.angle = math.radians(rng.uniform(-limit, limit))
        base = np.array(SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], dtype=np.float64)
        self.skin = rgb(base + rng.normal(0.0, 6.0, size=3))
        self.hair = rgb(
            np.array(HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))]) + rng.normal(0, 5, 3)
        )
        self.rng = rng

    def outline_local(self) -> np.ndarray:
        """The face outline (head ellipse, enlarged where the hair is), OUTLINE_POINTS x 2."""
        t = np.linspace(0.0, 2.0 * math.pi, OUTLINE_POINTS, endpoint=False)
        rx = np.full_like(t, self.rx)
        ry = np.full_like(t, self.ry)
        if self.has_hair:
            in_hair = np.sin(t) <= math.sin(self.hair_side)
            rx[in_hair] *= self.hair_x
            ry[in_hair] *= self.hair_y
        return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)

    def rotation(self) -> np.ndarray:
        """2x2 rotation matrix of the head pose."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.array([[c, -s], [s, c]])

    def hair_local(self) -> np.ndarray:
        """Hair cap: the outer hair arc, then the fringe (hairline) back across the forehead."""
        a = self.hair_side
        t = np.linspace(math.pi - a, 2.0 * math.pi + a, 40)
        outer = np.stack([self.hair_x * self.rx * np.cos(t), self.hair_y * self.ry * np.sin(t)], 1)
        u = np.linspace(0.0, math.pi, 24)
        half_w = 0.92 * self.rx * math.cos(a)
        fringe = np.stack(
            [half_w * np.cos(u), -0.05 * self.ry - self.hairline * self.ry * np.sin(u)], axis=1
        )
        return np.concatenate([outer, fringe], axis=0)

    def draw(self, draw: ImageDraw.ImageDraw, centre: Point) -> None:
        """Draw the face at ``centre`` (final-resolution pixels) on a SUPERSAMPLE canvas."""
        rng, rx, ry, s = self.rng, self.rx, self.ry, SUPERSAMPLE
        rot = self.rotation()
        offset = np.asarray(centre, dtype=np.float64)

        def pts(local: np.ndarray) -> list[Point]:
            world = (local @ rot.T + offset) * s
            return [(float(x), float(y)) for x, y in world]

        def width(px: float) -> int:
            return max(1, int(round(px * s)))

        skin_dark = _mix(self.skin, (40, 20, 10), 0.35)
        head = ellipse_points(0.0, 0.0, rx, ry)
        draw.polygon(pts(head), fill=self.skin)
        if rng.random() < 0.5:
            closed = np.concatenate([head, head[:1]], axis=0)
            draw.line(pts(closed), fill=skin_dark, width=width(max(0.6, 0.035 * rx)), joint="curve")
        if rng.random() < 0.25:  # cheeks
            blush = _mix(self.skin, (225, 110, 115), 0.35)
            for sx in (-1.0, 1.0):
                cheek = ellipse_points(sx * 0.5 * rx, 0.25 * ry, 0.16 * rx, 0.1 * ry)
                draw.polygon(pts(cheek), fill=blush)
        if self.has_hair:
            draw.polygon(pts(self.hair_local()), fill=self.hair)

        # Eyes.
        ex, ey = rng.uniform(0.28, 0.42) * rx, -rng.uniform(0.05, 0.2) * ry
        eye_dark = rgb(rng.uniform(10, 60, size=3))
        gaze = rng.uniform(-0.05, 0.05) * rx
        # Dark eyes vanish on dark skin: those faces mostly get white sclera.
        dark_skin = sum(self.skin) < 3 * 110
        sclera = rng.random() < (0.85 if dark_skin else 0.5)
        dark_w, dark_h = rng.uniform(0.08, 0.13) * rx, rng.uniform(0.08, 0.13) * ry
        for sx in (-1.0, 1.0):
            if sclera:
                white = ellipse_points(sx * ex, ey, 0.17 * rx, 0.11 * ry)
                draw.polygon(pts(white), fill=rgb(rng.uniform(235, 255, size=3)))
                pupil = ellipse_points(sx * ex + gaze, ey, 0.08 * rx, 0.09 * ry)
                draw.polygon(pts(pupil), fill=eye_dark)
            else:
                draw.polygon(pts(ellipse_points(sx * ex, ey, dark_w, dark_h)), fill=eye_dark)
        if rng.random() < 0.4:  # eyebrows
            brow = self.hair if self.has_hair else skin_dark
            lift = rng.uniform(0.2, 0.3) * ry
            for sx in (-1.0, 1.0):
                x0, x1 = sx * (ex - 0.14 * rx), sx * (ex + 0.14 * rx)
                ends = np.array([[x0, ey - lift], [x1, ey - lift]])
                draw.line(pts(ends), fill=brow, width=width(max(0.7, 0.05 * ry)))

        if rng.random() < 0.5:  # nose
            nose = np.array([[0.0, 0.02 * ry], [0.06 * rx, 0.22 * ry], [-0.02 * rx, 0.24 * ry]])
            draw.line(pts(nose), fill=skin_dark, width=width(max(0.6, 0.035 * ry)), joint="curve")

        # Mouth: smile / straight line / open.
        my, mw = rng.uniform(0.4, 0.55) * ry, rng.uniform(0.2, 0.4) * rx
        lips = _mix((150, 40, 50), self.skin, rng.uniform(0.0, 0.3))
        kind = rng.random()
        if kind < 0.25:
            draw.polygon(
                pts(ellipse_points(0.0, my, 0.7 * mw, rng.uniform(0.05, 0.1) * ry)), fill=lips
            )
        else:
            curve = rng.uniform(0.04, 0.14) * ry if kind < 0.75 else rng.uniform(-0.02, 0.02) * ry
            x = np.linspace(-mw, mw, 12)
            y = my + curve * (1.0 - (x / mw) ** 2)
            mouth = np.stack([x, y], axis=1)
            draw.line(pts(mouth), fill=lips, width=width(max(0.7, 0.05 * ry)), joint="curve")


def _box_overlaps(box: Box, placed: Sequence[Box]) -> bool:
    """True if ``box`` overlaps a placed one too much (IoU or coverage of the smaller box)."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        other_area = (other[2] - other[0]) * (other[3] - other[1])
        if inter / (area + other_area - inter) >= MAX_IOU:
            return True
        if inter / min(area, other_area) >= MAX_OVERLAP_OF_SMALLER:
            return True
    return False


def _clip_polygon(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clamp polygon points to the image and round to 0.01 px (stable JSON)."""
    clipped = np.stack(
        [np.clip(points[:, 0], 0.0, float(width)), np.clip(points[:, 1], 0.0, float(height))], 1
    )
    return np.round(clipped, 2)


def render_image(rng: np.random.Generator, empty: bool) -> tuple[Image.Image, list[np.ndarray]]:
    """Draw one image; return it and the clipped outline polygon (N x 2) of every face."""
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    s = SUPERSAMPLE
    background = _background(rng, width, height)
    canvas = Image.fromarray(np.clip(np.round(background), 0, 255).astype(np.uint8))
    canvas = canvas.resize((width * s, height * s), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    _draw_clutter(rng, draw, width, height)

    num_faces = 0 if empty else int(rng.choice(np.arange(1, 5), p=FACE_COUNT_PROBS))
    max_height = min(MAX_FACE_HEIGHT, 0.75 * min(width, height))
    placed: list[Box] = []
    polygons: list[np.ndarray] = []
    for _ in range(num_faces):
        for attempt in range(PLACEMENT_TRIES):
            # Later attempts try smaller faces so that crowded images still fit their faces.
            top = max(MIN_FACE_HEIGHT, max_height * (1.0 - attempt / (1.5 * PLACEMENT_TRIES)))
            face = Face(rng, rng.uniform(MIN_FACE_HEIGHT, top))
            outline = face.outline_local() @ face.rotation().T
            lo, hi = outline.min(axis=0), outline.max(axis=0)
            cx_range = (-lo[0] - MAX_CUT, width - hi[0] + MAX_CUT)
            cy_range = (-lo[1] - MAX_CUT, height - hi[1] + MAX_CUT)
            if cx_range[0] > cx_range[1] or cy_range[0] > cy_range[1]:
                continue
            centre = (rng.uniform(*cx_range), rng.uniform(*cy_range))
            polygon = _clip_polygon(outline + np.asarray(centre), width, height)
            box = (*polygon.min(axis=0), *polygon.max(axis=0))
            if box[2] - box[0] < 1.0 or box[3] - box[1] < 1.0 or _box_overlaps(box, placed):
                continue
            face.draw(draw, centre)
            placed.append(box)  # type: ignore[arg-type]
            polygons.append(polygon)
            break

    image = canvas.resize((width, height), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float64)
    pixels = pixels + rng.normal(0.0, rng.uniform(1.0, 6.0), size=pixels.shape)
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return image, polygons


def _annotation(ann_id: int, image_id: int, polygon: np.ndarray) -> dict[str, Any]:
    """COCO annotation of one face; the box is the tight box of its (clipped) outline polygon."""
    x0, y0 = (float(v) for v in polygon.min(axis=0))
    x1, y1 = (float(v) for v in polygon.max(axis=0))
    w, h = round(x1 - x0, 2), round(y1 - y0, 2)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [x0, y0, w, h],
        "area": round(w * h, 2),
        "iscrowd": 0,
        "segmentation": [[float(v) for v in polygon.reshape(-1)]],
    }


def _generate_split(out_dir: Path, split: str, num_images: int, seed: int) -> dict[str, int]:
    """Render one split to ``out_dir/split/*.png`` and ``out_dir/split.json``; return counts."""
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    empty_images = 0
    for index in range(num_images):
        # One generator per image: images do not depend on each other nor on the split sizes.
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        image, polygons = render_image(rng, empty=index % EMPTY_EVERY == EMPTY_EVERY - 1)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        image.save(image_dir / file_name, format="PNG", optimize=False, compress_level=1)
        images.append(
            {"id": image_id, "file_name": file_name, "height": image.height, "width": image.width}
        )
        for polygon in polygons:
            annotations.append(_annotation(len(annotations) + 1, image_id, polygon))
        empty_images += not polygons
    coco = {
        "info": {
            "description": "Synthetic cartoon faces (not real people) for the detr_d2 CPU demo",
            "generator": "tools/make_sample_faces.py (detr_tools.samples.faces)",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "split": split,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    with open(out_dir / f"{split}.json", "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    return {"images": len(images), "faces": len(annotations), "empty_images": empty_images}


def _remove_previous(out_dir: Path) -> None:
    """Delete what an earlier run wrote (only our own file names), so no stale image remains."""
    (out_dir / PARAMS_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        (out_dir / f"{split}.json").unlink(missing_ok=True)
        image_dir = out_dir / split
        if image_dir.is_dir():
            for path in image_dir.iterdir():
                if re.fullmatch(r"\d{6}\.png", path.name):
                    path.unlink()


def generate_face_dataset(
    out_dir: str | Path,
    num_train: int = 400,
    num_val: int = 60,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``train.json``, ``val.json``, ``train/*.png``, ``val/*.png`` under ``out_dir``.

    Skipped (quickly) when ``out_dir`` already holds a complete run with the same parameters,
    unless ``force``; so scripts may call it every time. Returns the per-split counts
    (``images``, ``faces``, ``empty_images``), ``skipped`` and ``seconds``.
    """
    return generate_splits_once(
        Path(out_dir),
        what="sample face",
        generator_version=GENERATOR_VERSION,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        marker_files=[f"{split}.json" for split in SPLITS],
        remove_previous=_remove_previous,
        generate_split=_generate_split,
        force=force,
    )
