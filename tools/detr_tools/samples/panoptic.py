"""Deterministic generator of a small synthetic panoptic dataset (COCO panoptic format).

Why: the panoptic CPU demo and tests need things *and* stuff that a small DETR learns from
scratch in minutes, offline, byte-identical wherever generated. Each scene has stuff regions
(sky, a brick wall, the ground below a wavy horizon) and a few things (the cartoon faces of
:mod:`.faces`, and striped balls). The label map is drawn at the final resolution from the
same geometry as the (supersampled, antialiased) image.

Written under ``out_dir``: ``{split}/*.png`` images, ``panoptic_{split}/*.png`` COCO panoptic
PNGs (id = R + 256 G + 256^2 B), ``panoptic_{split}.json``, ``instances_{split}.json`` (the things
as COCO instances with RLE masks, for box/mask AP) and ``params.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

# the cartoon faces of the sample face dataset, drawn the same way here
from .faces import SUPERSAMPLE, Face, ellipse_points, rgb
from .generated import PARAMS_FILE, generate_splits_once

__all__ = ["generate_panoptic_dataset", "render_scene", "CATEGORIES", "GENERATOR_VERSION"]

logger = logging.getLogger(__name__)

# Bump when the drawing changes, so that existing outputs are regenerated instead of skipped.
GENERATOR_VERSION = 2
FACE, BALL, SKY, WALL, GROUND = 1, 2, 3, 4, 5
CATEGORIES = [
    {"id": FACE, "name": "face", "supercategory": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": BALL, "name": "ball", "supercategory": "object", "isthing": 1, "color": [0, 0, 230]},
    {
        "id": SKY,
        "name": "sky",
        "supercategory": "background",
        "isthing": 0,
        "color": [70, 130, 180],
    },
    {
        "id": WALL,
        "name": "wall",
        "supercategory": "background",
        "isthing": 0,
        "color": [190, 153, 153],
    },
    {
        "id": GROUND,
        "name": "ground",
        "supercategory": "background",
        "isthing": 0,
        "color": [107, 142, 35],
    },
]
SPLITS = ("train", "val")

MIN_SIDE, MAX_SIDE = 128, 176
# 1 to 4 things per image, large enough for a from-scratch DETR to localise in minutes.
MAX_FACES, MAX_BALLS = 2, 2
MIN_FACE_HEIGHT, MAX_FACE_HEIGHT = 34.0, 72.0
MIN_BALL_RADIUS, MAX_BALL_RADIUS = 14.0, 28.0
# Things never overlap (their masks are then their full shapes); placement gives up after this.
PLACEMENT_TRIES = 30
# A thing clipped by the border to fewer pixels than this is not kept (too small to learn).
MIN_THING_AREA = 40
BALL_COLOURS = (
    (220, 40, 40),
    (40, 90, 220),
    (240, 200, 30),
    (150, 50, 200),
    (30, 170, 90),
    (250, 120, 20),
)
WALL_COLOURS = ((150, 70, 55), (120, 120, 125), (95, 105, 130), (170, 150, 120))
GROUND_COLOURS = ((70, 130, 50), (110, 80, 50), (150, 140, 110), (60, 100, 70))

Polygon = np.ndarray  # [P, 2] (x, y) in final-resolution pixels


def _stuff_layout(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Stuff category of every pixel [H, W]: ground below a wavy horizon; above it sky, a wall
    standing on the ground (sometimes), or only wall (an indoor scene)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    horizon = rng.uniform(0.4, 0.72) * height
    amplitude, phase = rng.uniform(0.0, 0.05) * height, rng.uniform(0.0, 2.0 * math.pi)
    waves = rng.uniform(0.5, 2.0)
    ground = ys >= horizon + amplitude * np.sin(2.0 * math.pi * waves * xs / width + phase)
    stuff = np.full((height, width), SKY, dtype=np.int64)
    kind = rng.random()
    if kind < 0.2:
        stuff[:] = WALL
    elif kind < 0.7:
        x0 = rng.uniform(-0.3, 0.5) * width
        x1 = x0 + rng.uniform(0.35, 0.9) * width
        top = rng.uniform(0.1, 0.8) * (horizon - amplitude)
        stuff[(xs >= x0) & (xs < x1) & (ys >= top)] = WALL
    stuff[ground] = GROUND
    return stuff


def _stuff_pixels(rng: np.random.Generator, stuff: np.ndarray) -> np.ndarray:
    """float [H, W, 3] colours of the stuff regions: sky gradient with clouds, bricks, ground."""
    height, width = stuff.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))

    top, bottom = np.array([60.0, 110.0, 200.0]), np.array([160.0, 200.0, 240.0])
    top += rng.normal(0.0, 12.0, 3)
    t = (ys / height)[..., None]
    sky = top * (1.0 - t) + bottom * t
    for _ in range(int(rng.integers(0, 4))):  # soft clouds
        cx, cy = rng.uniform(0, width), rng.uniform(0, 0.5 * height)
        rx, ry = rng.uniform(12, 40), rng.uniform(5, 12)
        weight = np.clip(1.2 - ((xs - cx) / rx) ** 2 - ((ys - cy) / ry) ** 2, 0.0, 1.0)[..., None]
        sky = sky * (1.0 - 0.8 * weight) + 245.0 * 0.8 * weight
    img[stuff == SKY] = sky[stuff == SKY]

    brick = np.array(
        WALL_COLOURS[int(rng.integers(len(WALL_COLOURS)))], dtype=np.float64
    ) + rng.normal(0, 8, 3)
    mortar = np.clip(brick + 70.0, 0, 255)
    row_h, brick_w = rng.uniform(5.0, 9.0), rng.uniform(12.0, 22.0)
    row = np.floor(ys / row_h)
    offset = (row % 2) * brick_w / 2.0
    is_mortar = ((ys % row_h) < 1.0) | (((xs + offset) % brick_w) < 1.0)
    wall = np.where(is_mortar[..., None], mortar, brick + rng.normal(0.0, 6.0, (height, width, 1)))
    img[stuff == WALL] = wall[stuff == WALL]

    soil = np.array(
        GROUND_COLOURS[int(rng.integers(len(GROUND_COLOURS)))], dtype=np.float64
    ) + rng.normal(0, 8, 3)
    streaks = np.sin(ys * rng.uniform(0.8, 1.6) + rng.uniform(0, 6.0))[..., None] * 10.0
    ground = soil + streaks + rng.normal(0.0, 10.0, (height, width, 1))
    img[stuff == GROUND] = ground[stuff == GROUND]
    return img


def _ball_polygon(centre: tuple[float, float], radius: float, squash: float = 1.0) -> Polygon:
    return ellipse_points(centre[0], centre[1], radius, radius * squash)


def _draw_ball(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: float
) -> None:
    """A ball with a contrasting band and a highlight, all inside its circle."""
    s = SUPERSAMPLE
    colour = np.array(BALL_COLOURS[int(rng.integers(len(BALL_COLOURS)))], dtype=np.float64)
    band = rgb(np.clip(colour + rng.choice([-1.0, 1.0]) * 110.0, 0, 255))
    cx, cy = centre
    draw.ellipse(
        [(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s],
        fill=rgb(colour),
    )
    inner = radius * rng.uniform(0.45, 0.7)
    draw.ellipse(
        [(cx - inner) * s, (cy - inner) * s, (cx + inner) * s, (cy + inner) * s], fill=band
    )
    core = inner * 0.6
    draw.ellipse(
        [(cx - core) * s, (cy - core) * s, (cx + core) * s, (cy + core) * s], fill=rgb(colour)
    )
    hx, hy, hr = cx - 0.45 * radius, cy - 0.45 * radius, 0.18 * radius
    draw.ellipse([(hx - hr) * s, (hy - hr) * s, (hx + hr) * s, (hy + hr) * s], fill=(250, 250, 250))


def _polygon_mask(polygon: Polygon, width: int, height: int) -> np.ndarray:
    """bool [H, W]: pixels whose centre lies inside the polygon."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in polygon], fill=1)
    return np.asarray(canvas, dtype=bool)


def render_scene(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, list[tuple[int, int]]]:
    """Draw one scene.

    Returns:
        the RGB image; the segment id of every pixel [H, W] (int64, ids from 1); and the
        ``(segment id, category id)`` of every segment (stuff first, then things).
    """
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    s = SUPERSAMPLE
    stuff = _stuff_layout(rng, width, height)
    background = np.clip(np.round(_stuff_pixels(rng, stuff)), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(background).resize((width * s, height * s), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)

    num_faces = int(rng.integers(0, MAX_FACES + 1))
    kinds = [FACE] * num_faces + [BALL] * int(rng.integers(0 if num_faces else 1, MAX_BALLS + 1))
    rng.shuffle(kinds)
    placed: list[tuple[float, float, float, float]] = []
    things: list[tuple[int, np.ndarray]] = []
    for kind in kinds:
        for _ in range(PLACEMENT_TRIES):
            if kind == FACE:
                face = Face(
                    rng,
                    rng.uniform(MIN_FACE_HEIGHT, min(MAX_FACE_HEIGHT, 0.6 * min(width, height))),
                )
                outline = face.outline_local() @ face.rotation().T
            else:
                radius = rng.uniform(MIN_BALL_RADIUS, MAX_BALL_RADIUS)
                outline = _ball_polygon((0.0, 0.0), radius)
            lo, hi = outline.min(axis=0), outline.max(axis=0)
            centre = (
                rng.uniform(-lo[0] - 4.0, width - hi[0] + 4.0),
                rng.uniform(-lo[1] - 4.0, height - hi[1] + 4.0),
            )
            polygon = outline + np.asarray(centre)
            box = (*polygon.min(axis=0), *polygon.max(axis=0))
            if any(
                box[0] < b[2] + 2 and b[0] < box[2] + 2 and box[1] < b[3] + 2 and b[1] < box[3] + 2
                for b in placed
            ):
                continue  # boxes (plus a 2-pixel margin) must not touch
            mask = _polygon_mask(polygon, width, height)
            if mask.sum() < MIN_THING_AREA:
                continue
            if kind == FACE:
                face.draw(draw, centre)
            else:
                _draw_ball(rng, draw, centre, radius)
            placed.append(box)
            things.append((kind, mask))
            break

    image = canvas.resize((width, height), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(
        0.0, rng.uniform(1.0, 5.0), (height, width, 3)
    )
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))

    ids = np.zeros((height, width), dtype=np.int64)
    segments: list[tuple[int, int]] = []
    for category in (SKY, WALL, GROUND):
        region = stuff == category
        for _, mask in things:
            region &= ~mask
        if region.any():
            segments.append((len(segments) + 1, category))
            ids[region] = len(segments)
    for kind, mask in things:
        segments.append((len(segments) + 1, kind))
        ids[mask] = len(segments)
    return image, ids, segments


def _id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] -> COCO panoptic PNG colours [H, W, 3] uint8."""
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def _bbox(mask: np.ndarray) -> list[int]:
    """COCO [x, y, w, h] of a non-empty mask (pixel extents)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _generate_split(out_dir: Path, split: str, num_images: int, seed: int) -> dict[str, int]:
    """Render one split; return counts of images and segments."""
    image_dir, png_dir = out_dir / split, out_dir / f"panoptic_{split}"
    image_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    images, panoptic_anns, instance_anns = [], [], []
    counts = {"images": num_images, "things": 0, "stuff": 0}
    for index in range(num_images):
        # One generator per image: images do not depend on each other nor on the split sizes.
        rng = np.random.default_rng([seed, SPLITS.index(split), index, 7])
        image, ids, segments = render_scene(rng)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        image.save(image_dir / file_name, format="PNG", optimize=False, compress_level=1)
        Image.fromarray(_id2rgb(ids)).save(
            png_dir / file_name, format="PNG", optimize=False, compress_level=1
        )
        images.append(
            {"id": image_id, "file_name": file_name, "height": image.height, "width": image.width}
        )
        segments_info = []
        for segment_id, category in segments:
            mask = ids == segment_id
            info = {
                "id": segment_id,
                "category_id": category,
                "area": int(mask.sum()),
                "bbox": _bbox(mask),
                "iscrowd": 0,
            }
            segments_info.append(info)
            if category in (FACE, BALL):
                counts["things"] += 1
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                instance_anns.append(
                    {
                        "id": len(instance_anns) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "segmentation": rle,
                        "area": info["area"],
                        "bbox": info["bbox"],
                        "iscrowd": 0,
                    }
                )
            else:
                counts["stuff"] += 1
        panoptic_anns.append(
            {"image_id": image_id, "file_name": file_name, "segments_info": segments_info}
        )
    info = {
        "description": "Synthetic scenes (sky, wall, ground; cartoon faces, balls) "
        "for the detr_d2 panoptic demo",
        "generator": "tools/make_sample_panoptic.py (detr_tools.samples.panoptic)",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
    }
    panoptic = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": panoptic_anns,
        "categories": CATEGORIES,
    }
    things = [c for c in CATEGORIES if c["isthing"]]
    instances = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": instance_anns,
        "categories": things,
    }
    for name, data in (
        (f"panoptic_{split}.json", panoptic),
        (f"instances_{split}.json", instances),
    ):
        with open(out_dir / name, "w") as f:
            json.dump(data, f, separators=(",", ":"))
    return counts


def _remove_previous(out_dir: Path) -> None:
    """Delete what an earlier run wrote (only our own file names), so no stale file remains."""
    (out_dir / PARAMS_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for name in (f"panoptic_{split}.json", f"instances_{split}.json"):
            (out_dir / name).unlink(missing_ok=True)
        for folder in (out_dir / split, out_dir / f"panoptic_{split}"):
            if folder.is_dir():
                for path in folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
                    path.unlink()


def generate_panoptic_dataset(
    out_dir: str | Path,
    num_train: int = 300,
    num_val: int = 40,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Write the dataset under ``out_dir`` (see the module docstring).

    Skipped (quickly) when ``out_dir`` already holds a complete run with the same parameters,
    unless ``force``. Returns per-split counts (``images``, ``things``, ``stuff`` segments),
    ``skipped`` and ``seconds``.
    """
    return generate_splits_once(
        Path(out_dir),
        what="sample panoptic",
        generator_version=GENERATOR_VERSION,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        marker_files=[f"panoptic_{split}.json" for split in SPLITS],
        remove_previous=_remove_previous,
        generate_split=_generate_split,
        force=force,
    )
