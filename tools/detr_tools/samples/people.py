"""Deterministic generator of a synthetic multi-class "people" detection dataset (COCO format).

Why: a small DETR is pretrained on this stand-in for COCO before it is fine-tuned on the sample
face dataset (:mod:`.faces`), offline and byte-identical wherever it is generated (PNG images, one
seeded numpy generator per image, no global random state). A person is a standing cartoon figure
whose head *is* a face of :mod:`.faces` (same skin tones, eyes, mouth, hair and pose), so what is
learnt on people carries over to faces; its box covers the whole figure, as COCO's person does.
The other classes are simple drawings of COCO objects. Categories keep COCO's names and ids (not
contiguous), so the files read like COCO's ``instances_*.json``. Images, backgrounds and clutter
are the face sample's; there is deliberately no "face" class.

Written under ``out_dir``: ``{split}.json``, ``{split}/*.png`` and ``params.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# The face sample's drawing pieces (private ones included: same package), so that the heads, the
# backgrounds, the clutter and the overlap rule are exactly the face sample's.
from .faces import (
    MAX_CUT,
    MAX_SIDE,
    MIN_SIDE,
    SUPERSAMPLE,
    Face,
    _background,
    _box_overlaps,
    _draw_clutter,
    _mix,
    _non_skin_colour,
    _remove_previous,  # same splits and file names as the face sample
    ellipse_points,
    rgb,
)
from .generated import generate_splits_once

__all__ = [
    "generate_people_dataset",
    "render_image",
    "DrawnObject",
    "CATEGORIES",
    "GENERATOR_VERSION",
]

logger = logging.getLogger(__name__)

# Bump when the drawing changes, so that existing outputs are regenerated instead of skipped.
GENERATOR_VERSION = 1
# COCO's category ids, names and supercategories (detectron2's builtin_meta.COCO_CATEGORIES).
PERSON, CAR, UMBRELLA, SPORTS_BALL, KITE, CUP = 1, 3, 28, 37, 38, 47
CATEGORIES = [
    {"id": PERSON, "name": "person", "supercategory": "person"},
    {"id": CAR, "name": "car", "supercategory": "vehicle"},
    {"id": UMBRELLA, "name": "umbrella", "supercategory": "accessory"},
    {"id": SPORTS_BALL, "name": "sports ball", "supercategory": "sports"},
    {"id": KITE, "name": "kite", "supercategory": "sports"},
    {"id": CUP, "name": "cup", "supercategory": "kitchen"},
]
CATEGORY_NAMES = {c["id"]: c["name"] for c in CATEGORIES}
SPLITS = ("train", "val")

# Every EMPTY_EVERY-th image has no object: exactly 4 % negatives, also in small splits.
EMPTY_EVERY = 25
# Probabilities of 1..5 objects in a non-empty image.
OBJECT_COUNT_PROBS = (0.22, 0.24, 0.22, 0.18, 0.14)
# Class of each object, in CATEGORIES order. Persons are placed first (they are the largest), so
# they rarely fail to fit and make up about half of the instances, as in COCO.
CLASS_PROBS = (0.48, 0.12, 0.1, 0.1, 0.1, 0.1)
# Object size in px (person: height; car: length; umbrella: canopy width; ball: diameter; kite:
# diamond height; cup: height), log-uniform in [min, max], max also bounded by a fraction of the
# image's smaller side.
SIZES: dict[int, tuple[float, float, float]] = {
    PERSON: (44.0, 200.0, 1.2),
    CAR: (36.0, 150.0, 0.9),
    UMBRELLA: (26.0, 110.0, 0.7),
    SPORTS_BALL: (10.0, 56.0, 0.4),
    KITE: (20.0, 80.0, 0.45),
    CUP: (16.0, 60.0, 0.45),
}
# The head (a faces.Face) is this fraction of the person's height: heads about 9-48 px.
HEAD_FRACTION = (0.2, 0.24)
# How far an object may stick out of the image, as a fraction of its box width and height; a
# person's head stays inside (MAX_CUT px), but its legs may be cut by the bottom border.
SIDE_CUT, PERSON_BOTTOM_CUT = 0.2, 0.35
# Clipped boxes thinner than this are not kept (nothing left to learn from).
MIN_BOX_SIDE = 4.0
PLACEMENT_TRIES = 30

TROUSER_COLOURS = (
    (40, 60, 110),
    (60, 85, 140),
    (30, 30, 35),
    (80, 80, 85),
    (50, 70, 50),
    (110, 40, 40),
    (20, 35, 70),
)
CAR_COLOURS = (
    (200, 30, 35),
    (30, 60, 160),
    (235, 235, 235),
    (160, 165, 170),
    (30, 30, 35),
    (230, 190, 30),
    (40, 120, 60),
    (120, 20, 40),
)
BEACH_BALL_COLOURS = ((220, 40, 40), (245, 245, 245), (40, 90, 220), (245, 200, 30), (40, 170, 80))

Colour = tuple[int, int, int]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1
Polygon = np.ndarray  # [P, 2] (x, y) pixels


@dataclass
class DrawnObject:
    """One annotated object of a rendered image, in final-resolution pixels.

    ``polygons`` are its parts clipped to the image (their union is the object), ``box`` their
    tight box, and ``head_box`` the tight box of a person's (clipped) head, None for other classes.
    """

    category_id: int
    polygons: list[Polygon]
    box: Box
    head_box: Box | None = None


@dataclass
class _Sketch:
    """An object in object-local pixels (y down), before placement."""

    category_id: int
    fills: list[tuple[Polygon, Colour]] = field(default_factory=list)  # drawn in this order
    silhouette: list[Polygon] = field(default_factory=list)  # union = the object
    face: Face | None = None  # a person's head, drawn last at head_centre
    head_centre: tuple[float, float] = (0.0, 0.0)

    def add(self, polygon: Polygon, colour: Colour, *, outline: bool = True) -> None:
        """Draw ``polygon``; ``outline``: it is part of the object's silhouette."""
        self.fills.append((polygon, colour))
        if outline:
            self.silhouette.append(polygon)

    def head(self) -> Polygon | None:
        """The head outline (face and hair) of a person."""
        if self.face is None:
            return None
        return self.face.outline_local() @ self.face.rotation().T + np.asarray(self.head_centre)

    def rotated(self, angle: float) -> _Sketch:
        """The sketch turned by ``angle`` radians about its origin (objects without a face)."""
        assert self.face is None, "a person is drawn standing"
        turn = _turn(angle)
        out = _Sketch(self.category_id)
        out.fills = [(p @ turn, colour) for p, colour in self.fills]
        out.silhouette = [p @ turn for p in self.silhouette]
        return out


def _turn(angle: float) -> np.ndarray:
    """Transposed 2x2 rotation: ``points @ _turn(a)`` turns row points by ``a``."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, s], [-s, c]])


def _circle(cx: float, cy: float, r: float, n: int = 32) -> Polygon:
    return ellipse_points(cx, cy, r, r, n)


def _segment(p0: Sequence[float], p1: Sequence[float], width: float) -> Polygon:
    """A straight bar of ``width`` from ``p0`` to ``p1`` as a quadrilateral."""
    a, b = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    d = b - a
    normal = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-9) * (0.5 * width)
    return np.stack([a + normal, b + normal, b - normal, a - normal])


def _stroke(points: Polygon, width: float) -> Polygon:
    """A band of ``width`` along a smooth polyline (normals from central differences)."""
    tangents = np.gradient(points, axis=0)
    normals = np.stack([-tangents[:, 1], tangents[:, 0]], axis=1)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-9)
    return np.concatenate([points + 0.5 * width * normals, (points - 0.5 * width * normals)[::-1]])


def _direction(side: float, degrees: float) -> np.ndarray:
    """Unit vector ``degrees`` away from straight down (y down), turned outwards on ``side``."""
    radians = math.radians(degrees)
    return np.array([side * math.sin(radians), math.cos(radians)])


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _jitter(rng: np.random.Generator, colours: Sequence[Colour], sigma: float = 8.0) -> Colour:
    """One of ``colours``, slightly varied."""
    base = np.asarray(colours[int(rng.integers(len(colours)))], dtype=np.float64)
    return rgb(base + rng.normal(0.0, sigma, size=3))


def _person(rng: np.random.Generator, height: float) -> _Sketch:
    """A standing figure ``height`` px tall, feet at y = 0, body axis at x = 0.

    Proportions are cartoon ones (a big head, about a fifth of the height), so that the heads
    reach the sizes of the sample faces.
    """
    sketch = _Sketch(PERSON)
    face = Face(rng, height * rng.uniform(*HEAD_FRACTION))
    skin = face.skin
    shirt = _non_skin_colour(rng) if rng.random() < 0.8 else _jitter(rng, ((235, 235, 230),))
    sleeve = _mix(shirt, (0, 0, 0), 0.15)  # a little darker, so arms show over the torso
    trousers = _jitter(rng, TROUSER_COLOURS)
    shoe = rgb(rng.uniform(15.0, 70.0, size=3))

    # The face box's top is the hair (hair_y x ry above the head centre) or the head itself.
    head_y = -height + (face.hair_y if face.has_hair else 1.0) * face.ry
    chin_y = head_y + face.ry
    shoulder_y = chin_y + rng.uniform(0.02, 0.05) * height
    hip_y = shoulder_y + rng.uniform(0.27, 0.32) * height
    half_shoulders = rng.uniform(0.11, 0.15) * height
    half_hips = half_shoulders * rng.uniform(0.75, 0.9)
    leg_w = rng.uniform(0.07, 0.095) * height
    arm_w = leg_w * rng.uniform(0.75, 0.9)
    shoe_h = 0.04 * height
    stance = rng.uniform(-0.02, 0.07) * height
    shorts = rng.random() < 0.25
    dress = not shorts and rng.random() < 0.2

    for sx in (-1.0, 1.0):
        top = np.array([sx * (half_hips - 0.5 * leg_w), hip_y - 0.02 * height])
        foot = np.array([sx * (half_hips - 0.5 * leg_w + stance), -0.5 * shoe_h])
        if shorts:
            knee = top + 0.45 * (foot - top)
            sketch.add(_segment(knee, foot, 0.85 * leg_w), skin)
            sketch.add(_segment(top, knee + 0.05 * (foot - top), leg_w), trousers)
        else:
            sketch.add(_segment(top, foot, leg_w), trousers)
        toe = foot[0] + sx * 0.25 * leg_w
        sketch.add(ellipse_points(toe, -0.5 * shoe_h, 0.8 * leg_w, 0.5 * shoe_h, 20), shoe)
    if not dress:
        sketch.add(
            _rect(-half_hips, hip_y - 0.03 * height, half_hips, hip_y + 0.06 * height), trousers
        )

    # The neck follows the head's tilt: from inside the head down to the shoulders.
    neck_top = np.asarray(face.rotation() @ np.array([0.0, 0.5 * face.ry])) + [0.0, head_y]
    sketch.add(_segment(neck_top, (0.0, shoulder_y + 0.03 * height), 0.45 * face.rx), skin)

    corner = 0.5 * arm_w
    torso = [
        (-half_shoulders + corner, shoulder_y),
        (half_shoulders - corner, shoulder_y),
        (half_shoulders, shoulder_y + corner),
        (half_hips, hip_y),
    ]
    if dress:
        hem_y, hem_x = hip_y + rng.uniform(0.12, 0.2) * height, half_hips * rng.uniform(1.3, 1.7)
        torso += [(hem_x, hem_y), (-hem_x, hem_y)]
    torso += [(-half_hips, hip_y), (-half_shoulders, shoulder_y + corner)]
    sketch.add(np.array(torso, dtype=np.float64), shirt)

    long_sleeves = rng.random() < 0.6
    upper, lower = rng.uniform(0.17, 0.2, size=2) * height
    for sx in (-1.0, 1.0):
        # Angles from straight down, outwards positive: hanging, raised (waving) or on the hip.
        pose = rng.random()
        if pose < 0.6:
            a1 = rng.uniform(5.0, 25.0)
            a2 = a1 + rng.uniform(-10.0, 20.0)
        elif pose < 0.8:
            a1, a2 = rng.uniform(110.0, 160.0), rng.uniform(150.0, 180.0)
        else:
            a1 = rng.uniform(35.0, 55.0)
            a2 = a1 - rng.uniform(75.0, 100.0)
        shoulder = np.array([sx * (half_shoulders - 0.5 * arm_w), shoulder_y + 0.5 * arm_w])
        elbow = shoulder + upper * _direction(sx, a1)
        hand = elbow + lower * _direction(sx, a2)
        arm = sleeve if long_sleeves else skin
        sketch.add(_segment(shoulder, elbow, arm_w), arm)
        sketch.add(_circle(*elbow, 0.5 * arm_w, 16), arm)
        sketch.add(_segment(elbow, hand, 0.9 * arm_w), arm)
        if not long_sleeves:
            sleeve_end = shoulder + 0.55 * (elbow - shoulder)
            sketch.add(_segment(shoulder, sleeve_end, 1.1 * arm_w), sleeve)
        sketch.add(_circle(*shoulder, 0.55 * arm_w, 16), sleeve)
        sketch.add(_circle(*hand, 0.55 * arm_w, 16), skin)

    sketch.face, sketch.head_centre = face, (0.0, head_y)
    sketch.silhouette.append(sketch.head())
    return sketch


def _car(rng: np.random.Generator, length: float) -> _Sketch:
    """A car seen from the side, ``length`` px long, wheels on y = 0, facing left or right."""
    sketch = _Sketch(CAR)
    body_colour = _jitter(rng, CAR_COLOURS)
    glass = _jitter(rng, ((175, 200, 215), (120, 140, 160)))
    n = length
    wheel_r = rng.uniform(0.1, 0.13) * n
    bottom = -0.55 * wheel_r
    top = bottom - rng.uniform(0.18, 0.25) * n
    roof = top - rng.uniform(0.15, 0.22) * n
    back, front = -0.5 * n, 0.5 * n
    body = [
        (back, bottom),
        (back, top + 0.04 * n),
        (back + 0.04 * n, top),
        (front - 0.1 * n, top),
        (front, top + 0.08 * n),
        (front, bottom),
    ]
    cabin = [
        (-0.36 * n, top + 0.5),
        (-0.27 * n, roof),
        (rng.uniform(0.0, 0.08) * n, roof),
        (rng.uniform(0.18, 0.26) * n, top + 0.5),
    ]
    cabin_pts = np.array(cabin)
    centre = cabin_pts.mean(axis=0)
    window = centre + 0.75 * (cabin_pts - centre) + [0.0, 0.04 * (top - roof)]
    sketch.add(np.array(body), body_colour)
    sketch.add(cabin_pts, body_colour)
    sketch.add(window, glass, outline=False)
    pillar = _segment((centre[0], roof), (centre[0], top), max(0.8, 0.03 * n))
    sketch.add(pillar, body_colour, outline=False)
    light_y0 = top + 0.06 * n
    light_y1 = light_y0 + max(1.0, 0.04 * n)
    sketch.add(_rect(front - 0.03 * n, light_y0, front, light_y1), (250, 220, 90), outline=False)
    sketch.add(_rect(back, light_y0, back + 0.02 * n, light_y1), (200, 20, 20), outline=False)
    for wx in (-0.3 * n, 0.3 * n):
        sketch.add(_circle(wx, -wheel_r, wheel_r), (25, 25, 28))
        sketch.add(_circle(wx, -wheel_r, 0.5 * wheel_r, 20), (170, 170, 175), outline=False)
    if rng.random() < 0.5:  # facing left
        mirror = np.array([-1.0, 1.0])
        sketch.fills = [(p * mirror, c) for p, c in sketch.fills]
        sketch.silhouette = [p * mirror for p in sketch.silhouette]
    return sketch


def _umbrella(rng: np.random.Generator, width: float) -> _Sketch:
    """An open umbrella, canopy ``width`` px wide with striped panels, tilted a little."""
    sketch = _Sketch(UMBRELLA)
    colours = (
        _non_skin_colour(rng),
        _non_skin_colour(rng) if rng.random() < 0.6 else (245, 245, 245),
    )
    rx, ry = 0.5 * width, rng.uniform(0.35, 0.5) * width
    panels = int(rng.integers(5, 9))
    tips = -rx * np.cos(np.arange(panels + 1) * math.pi / panels)  # ribs evenly spaced in angle
    v = np.linspace(0.0, 0.5 * math.pi, 12)

    def rib(k: int) -> Polygon:  # apex -> tip k, a meridian of the dome seen from the side
        return np.stack([tips[k] * np.sin(v), -ry * np.cos(v)], axis=1)

    def scallop(k: int) -> Polygon:  # tip k -> tip k + 1, the hem between two ribs
        u = np.linspace(0.0, 1.0, 7)[1:-1]
        x = tips[k] + u * (tips[k + 1] - tips[k])
        return np.stack([x, -0.18 * (tips[k + 1] - tips[k]) * np.sin(math.pi * u)], axis=1)

    shaft_end = rng.uniform(0.45, 0.6) * width
    stick = max(0.8, 0.025 * width)
    hook_r = 0.07 * width
    t = np.linspace(0.0, math.pi, 12)
    hook = np.stack([hook_r - hook_r * np.cos(t), shaft_end + hook_r * np.sin(t)], axis=1)
    sketch.add(_segment((0.0, -0.2 * ry), (0.0, shaft_end), stick), (90, 90, 95))
    sketch.add(_stroke(hook, max(1.0, 0.04 * width)), (45, 32, 25))
    sketch.add(_segment((0.0, -ry), (0.0, -ry - 0.07 * width), stick), (60, 60, 65))
    hem = [scallop(k)[::-1] for k in reversed(range(panels))]
    canopy = np.concatenate([rib(0)[::-1], rib(panels)[1:], *hem])
    sketch.add(canopy, colours[0])
    for k in range(1, panels, 2):
        panel = np.concatenate([rib(k), scallop(k), rib(k + 1)[::-1]])
        sketch.add(panel, colours[1], outline=False)
    return sketch.rotated(math.radians(rng.uniform(-30.0, 30.0)))


def _sports_ball(rng: np.random.Generator, diameter: float) -> _Sketch:
    """A soccer ball, basketball, tennis ball or beach ball, centred on the origin."""
    sketch = _Sketch(SPORTS_BALL)
    r = 0.5 * diameter
    theta = rng.uniform(0.0, 2.0 * math.pi)
    kind = int(rng.integers(4))
    ball = _circle(0.0, 0.0, r, 48)

    def seams(offset: float) -> list[Polygon]:  # two arcs bowed towards the centre
        out = []
        for sign in (-1.0, 1.0):
            direction = sign * np.array([math.cos(theta), math.sin(theta)])
            t = np.linspace(-1.2, 1.2, 24) + math.atan2(-direction[1], -direction[0])
            arc = offset * r * direction + r * np.stack([np.cos(t), np.sin(t)], axis=1)
            arc = arc[np.hypot(arc[:, 0], arc[:, 1]) < 0.96 * r]
            if len(arc) >= 2:
                out.append(_stroke(arc, max(0.7, 0.07 * r)))
        return out

    if kind == 0:  # soccer ball
        base = _jitter(rng, ((240, 240, 240),), 5.0)
        sketch.add(ball, base)
        patch = (25, 25, 25)
        sketch.add(
            ellipse_points(0.0, 0.0, 0.3 * r, 0.3 * r, 5) @ _turn(theta), patch, outline=False
        )
        for k in range(5):
            a = theta + (k + 0.5) * 2.0 * math.pi / 5.0
            sketch.add(
                _circle(0.76 * r * math.cos(a), 0.76 * r * math.sin(a), 0.18 * r, 5),
                patch,
                outline=False,
            )
    elif kind == 1:  # basketball
        base = _jitter(rng, ((215, 105, 35),))
        sketch.add(ball, base)
        line = (40, 25, 20)
        for a in (theta, theta + 0.5 * math.pi):
            end = 0.97 * r * np.array([math.cos(a), math.sin(a)])
            sketch.add(_segment(-end, end, max(0.7, 0.07 * r)), line, outline=False)
        for seam in seams(1.3):
            sketch.add(seam, line, outline=False)
    elif kind == 2:  # tennis ball
        base = _jitter(rng, ((205, 225, 55),))
        sketch.add(ball, base)
        for seam in seams(1.35):
            sketch.add(seam, (245, 245, 235), outline=False)
    else:  # beach ball
        first = int(rng.integers(len(BEACH_BALL_COLOURS)))
        base = BEACH_BALL_COLOURS[first]
        sketch.add(ball, base)
        for k in range(1, 6, 2):
            t = np.linspace(theta + k * math.pi / 3.0, theta + (k + 1) * math.pi / 3.0, 10)
            wedge = np.concatenate([[[0.0, 0.0]], r * np.stack([np.cos(t), np.sin(t)], axis=1)])
            colour = BEACH_BALL_COLOURS[(first + 1 + k // 2) % len(BEACH_BALL_COLOURS)]
            sketch.add(wedge, colour, outline=False)
        sketch.add(_circle(0.0, 0.0, 0.15 * r, 16), (245, 245, 245), outline=False)
    sketch.add(
        _circle(-0.42 * r, -0.42 * r, 0.15 * r, 12), _mix(base, (255, 255, 255), 0.6), outline=False
    )
    return sketch


def _kite(rng: np.random.Generator, size: float) -> _Sketch:
    """A diamond kite ``size`` px tall with crossed sticks and a bowed tail, tilted."""
    sketch = _Sketch(KITE)
    colours = (_non_skin_colour(rng), _non_skin_colour(rng))
    half_w = 0.5 * rng.uniform(0.6, 0.8) * size
    top, right = np.array([0.0, -0.35 * size]), np.array([half_w, 0.0])
    bottom, left = np.array([0.0, 0.65 * size]), np.array([-half_w, 0.0])
    centre = np.zeros(2)
    tail_len = rng.uniform(0.6, 1.1) * size
    y = np.linspace(0.0, tail_len, 16)
    wave = 0.08 * size * np.sin(2.0 * math.pi * y / (0.5 * size) + rng.uniform(0.0, 2.0 * math.pi))
    tail = np.stack([wave - wave[0], bottom[1] + y], axis=1)
    sketch.add(_stroke(tail, max(0.8, 0.02 * size)), (50, 40, 30))
    bow = 0.07 * size
    for index in (5, 10, 15):
        p = tail[index]
        for sx in (-1.0, 1.0):
            wing = np.array([p, p + [sx * bow, -0.6 * bow], p + [sx * bow, 0.6 * bow]])
            sketch.add(wing, colours[index % 2])
    sketch.add(np.array([top, right, bottom, left]), colours[0])
    for k, (a, b) in enumerate(((top, right), (right, bottom), (bottom, left), (left, top))):
        if k % 2:
            sketch.add(np.array([centre, a, b]), colours[1], outline=False)
    stick = max(0.6, 0.025 * size)
    sketch.add(_segment(top, bottom, stick), (70, 55, 40), outline=False)
    sketch.add(_segment(left, right, stick), (70, 55, 40), outline=False)
    return sketch.rotated(math.radians(rng.uniform(-35.0, 35.0)))


def _cup(rng: np.random.Generator, height: float) -> _Sketch:
    """A mug ``height`` px tall, bottom at y = 0, handle on one side."""
    sketch = _Sketch(CUP)
    colour = _jitter(rng, ((240, 240, 235),), 5.0) if rng.random() < 0.4 else _non_skin_colour(rng)
    h = height
    half_top = 0.5 * rng.uniform(0.7, 0.95) * h
    half_bottom = half_top * rng.uniform(0.75, 1.0)
    side = 1.0 if rng.random() < 0.5 else -1.0

    def edge(y: float) -> float:  # x of the right side of the body at height y
        return half_bottom + (half_top - half_bottom) * (-y / h)

    t = np.linspace(-0.5 * math.pi, 0.5 * math.pi, 16)
    handle = np.stack(
        [
            side * (edge(-0.54 * h) - 0.05 * h + 0.28 * h * np.cos(t)),
            -0.54 * h + 0.24 * h * np.sin(t),
        ],
        axis=1,
    )
    sketch.add(_stroke(handle, 0.09 * h), _mix(colour, (0, 0, 0), 0.1))
    r = 0.04 * h
    body = [
        (-half_top, -h),
        (half_top, -h),
        (half_bottom, -r),
        (half_bottom - r, 0.0),
        (-half_bottom + r, 0.0),
        (-half_bottom, -r),
    ]
    sketch.add(np.array(body), colour)
    if rng.random() < 0.5:
        y0, y1 = -0.62 * h, -0.45 * h
        band = [(-edge(y0), y0), (edge(y0), y0), (edge(y1), y1), (-edge(y1), y1)]
        sketch.add(np.array(band), _non_skin_colour(rng), outline=False)
    sketch.add(ellipse_points(0.0, -h, half_top, 0.09 * h, 32), _mix(colour, (255, 255, 255), 0.3))
    inside = _mix(colour, (0, 0, 0), 0.45) if rng.random() < 0.5 else (45, 28, 18)
    sketch.add(ellipse_points(0.0, -0.99 * h, 0.85 * half_top, 0.06 * h, 32), inside, outline=False)
    return sketch


BUILDERS: dict[int, Callable[[np.random.Generator, float], _Sketch]] = {
    PERSON: _person,
    CAR: _car,
    UMBRELLA: _umbrella,
    SPORTS_BALL: _sports_ball,
    KITE: _kite,
    CUP: _cup,
}


def _clip_to_image(polygon: Polygon, width: int, height: int) -> Polygon:
    """The part of a polygon inside the image (Sutherland-Hodgman), rounded to 0.01 px."""
    lo, hi = polygon.min(axis=0), polygon.max(axis=0)
    if lo[0] >= 0.0 and lo[1] >= 0.0 and hi[0] <= width and hi[1] <= height:
        return np.round(polygon, 2)
    points = [(float(x), float(y)) for x, y in polygon]
    edges = ((0, 0.0, False), (0, float(width), True), (1, 0.0, False), (1, float(height), True))
    for axis, bound, below in edges:
        kept: list[tuple[float, float]] = []
        for i, cur in enumerate(points):
            prev = points[i - 1]
            cur_in = cur[axis] <= bound if below else cur[axis] >= bound
            prev_in = prev[axis] <= bound if below else prev[axis] >= bound
            if cur_in != prev_in:
                f = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cross = (prev[0] + f * (cur[0] - prev[0]), prev[1] + f * (cur[1] - prev[1]))
                kept.append((bound, cross[1]) if axis == 0 else (cross[0], bound))
            if cur_in:
                kept.append(cur)
        points = kept
        if not points:
            break
    return np.round(np.asarray(points, dtype=np.float64).reshape(-1, 2), 2)


def _area(polygon: Polygon) -> float:
    """Shoelace area."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _extent(polygons: Sequence[Polygon]) -> Box:
    points = np.concatenate(polygons)
    x0, y0 = (float(v) for v in points.min(axis=0))
    x1, y1 = (float(v) for v in points.max(axis=0))
    return x0, y0, x1, y1


def _place(
    rng: np.random.Generator, sketch: _Sketch, width: int, height: int
) -> tuple[np.ndarray, list[Polygon]] | None:
    """A random offset that keeps the sketch inside the image up to the allowed cut, and its
    clipped silhouette; None when it cannot fit."""
    x0, y0, x1, y1 = _extent(sketch.silhouette)
    cut_x, cut_y = SIDE_CUT * (x1 - x0), SIDE_CUT * (y1 - y0)
    cut_top, cut_bottom = cut_y, cut_y
    if sketch.category_id == PERSON:
        cut_top, cut_bottom = MAX_CUT, PERSON_BOTTOM_CUT * (y1 - y0)
    x_range = (-x0 - cut_x, width - x1 + cut_x)
    y_range = (-y0 - cut_top, height - y1 + cut_bottom)
    if x_range[0] > x_range[1] or y_range[0] > y_range[1]:
        return None
    offset = np.array([rng.uniform(*x_range), rng.uniform(*y_range)])
    clipped = [_clip_to_image(p + offset, width, height) for p in sketch.silhouette]
    polygons = [p for p in clipped if len(p) >= 3 and _area(p) > 1e-3]
    return (offset, polygons) if polygons else None


def _draw(draw: ImageDraw.ImageDraw, sketch: _Sketch, offset: np.ndarray) -> None:
    """Draw a placed sketch on the SUPERSAMPLE canvas, the head (a faces.Face) last."""
    for polygon, colour in sketch.fills:
        world = (polygon + offset) * SUPERSAMPLE
        draw.polygon([(float(x), float(y)) for x, y in world], fill=colour)
    if sketch.face is not None:
        centre = (
            float(offset[0] + sketch.head_centre[0]),
            float(offset[1] + sketch.head_centre[1]),
        )
        sketch.face.draw(draw, centre)


def render_image(rng: np.random.Generator, empty: bool) -> tuple[Image.Image, list[DrawnObject]]:
    """Draw one image (face-sample size, background and clutter) and return it with its objects."""
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    background = _background(rng, width, height)
    canvas = Image.fromarray(np.clip(np.round(background), 0, 255).astype(np.uint8))
    canvas = canvas.resize((width * SUPERSAMPLE, height * SUPERSAMPLE), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    _draw_clutter(rng, draw, width, height)

    num_objects = 0 if empty else int(rng.choice(np.arange(1, 6), p=OBJECT_COUNT_PROBS))
    ids = np.array([c["id"] for c in CATEGORIES])
    classes = [int(c) for c in rng.choice(ids, size=num_objects, p=CLASS_PROBS)]
    classes.sort(key=lambda c: c != PERSON)  # persons (the largest) first, so that they fit
    placed: list[Box] = []
    objects: list[DrawnObject] = []
    for category_id in classes:
        low, high, image_fraction = SIZES[category_id]
        high = min(high, image_fraction * min(width, height))
        for attempt in range(PLACEMENT_TRIES):
            # Later attempts try smaller objects so that crowded images still fit theirs.
            top = max(low, high * (1.0 - attempt / (1.5 * PLACEMENT_TRIES)))
            size = math.exp(rng.uniform(math.log(low), math.log(top)))
            sketch = BUILDERS[category_id](rng, size)
            placement = _place(rng, sketch, width, height)
            if placement is None:
                continue
            offset, polygons = placement
            box = _extent(polygons)
            if box[2] - box[0] < MIN_BOX_SIDE or box[3] - box[1] < MIN_BOX_SIDE:
                continue
            if _box_overlaps(box, placed):
                continue
            head_box = None
            head = sketch.head()
            if head is not None:
                head_box = _extent([_clip_to_image(head + offset, width, height)])
            _draw(draw, sketch, offset)
            placed.append(box)
            objects.append(DrawnObject(category_id, polygons, box, head_box))
            break

    image = canvas.resize((width, height), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float64)
    pixels = pixels + rng.normal(0.0, rng.uniform(1.0, 6.0), size=pixels.shape)
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return image, objects


def _annotation(ann_id: int, image_id: int, obj: DrawnObject) -> dict[str, Any]:
    """COCO annotation; like the face sample's, ``area`` is the box area."""
    x0, y0, x1, y1 = obj.box
    w, h = round(x1 - x0, 2), round(y1 - y0, 2)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.category_id,
        "bbox": [x0, y0, w, h],
        "area": round(w * h, 2),
        "iscrowd": 0,
        "segmentation": [[float(v) for v in p.reshape(-1)] for p in obj.polygons],
    }


def _generate_split(out_dir: Path, split: str, num_images: int, seed: int) -> dict[str, int]:
    """Render one split to ``out_dir/split/*.png`` and ``out_dir/split.json``; return counts."""
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    counts = {"images": num_images, "instances": 0, "empty_images": 0}
    counts.update({c["name"]: 0 for c in CATEGORIES})
    for index in range(num_images):
        # One generator per image: images do not depend on each other nor on the split sizes.
        # The trailing 11 keeps these streams apart from the face sample's at the same seed.
        rng = np.random.default_rng([seed, SPLITS.index(split), index, 11])
        image, objects = render_image(rng, empty=index % EMPTY_EVERY == EMPTY_EVERY - 1)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        image.save(image_dir / file_name, format="PNG", optimize=False, compress_level=1)
        images.append(
            {"id": image_id, "file_name": file_name, "height": image.height, "width": image.width}
        )
        for obj in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, obj))
            counts[CATEGORY_NAMES[obj.category_id]] += 1
        counts["empty_images"] += not objects
    counts["instances"] = len(annotations)
    coco = {
        "info": {
            "description": "Synthetic cartoon people and objects (not real people) with COCO "
            "category ids, for pretraining detr_d2 before the face sample",
            "generator": "tools/make_sample_people.py (detr_tools.samples.people)",
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
    return counts


def generate_people_dataset(
    out_dir: str | Path,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``train.json``, ``val.json``, ``train/*.png``, ``val/*.png`` under ``out_dir``.

    Skipped (quickly) when ``out_dir`` already holds a complete run with the same parameters,
    unless ``force``; so scripts may call it every time. Returns, per split, the counts
    ``images``, ``instances``, ``empty_images`` and one count per category name (``person``,
    ``car``, ...); plus ``skipped`` and ``seconds``.
    """
    return generate_splits_once(
        Path(out_dir),
        what="sample people",
        generator_version=GENERATOR_VERSION,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        marker_files=[f"{split}.json" for split in SPLITS],
        remove_previous=_remove_previous,
        generate_split=_generate_split,
        force=force,
    )
