"""DETR's training and test augmentations as Detectron2 ``Augmentation``s.

The official DETR (``datasets/transforms.py`` and ``make_coco_transforms`` in
``datasets/coco.py``) resizes and crops PIL images with its own size rules. Detectron2's
built-in ``ResizeShortestEdge`` and ``RandomCrop`` round and sample slightly differently, so
the augmentations here restate the official rules and emit plain Detectron2 transforms
(``ResizeTransform``, ``CropTransform``), which also carry the boxes along.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from PIL import Image

__all__ = [
    "DetrResizeShortestEdge",
    "RandomSizeCrop",
    "RandomSelect",
    "build_detr_augmentation",
]

AugOrTransform = T.Augmentation | T.Transform


class DetrResizeShortestEdge(T.Augmentation):
    """Resize the shorter side to a size drawn uniformly from ``short_edge_lengths``.

    Matches the official ``RandomResize(sizes, max_size)``: the output size follows
    ``get_size_with_aspect_ratio`` exactly (the longer side is truncated, not rounded, unlike
    Detectron2's ``ResizeShortestEdge``), and the image is resized with PIL bilinear, as
    torchvision does for the official PIL images.
    """

    def __init__(self, short_edge_lengths: int | Sequence[int], max_size: int | None = None):
        """
        Args:
            short_edge_lengths: candidate shorter-side lengths; one is chosen per image.
            max_size: cap of the longer side, or None for no cap (the official pre-crop
                resize has none).
        """
        super().__init__()
        if isinstance(short_edge_lengths, int):
            short_edge_lengths = (short_edge_lengths,)
        short_edge_lengths = tuple(int(s) for s in short_edge_lengths)
        if not short_edge_lengths or min(short_edge_lengths) <= 0:
            raise ValueError(f"short_edge_lengths must be positive, got {short_edge_lengths}")
        if max_size is not None:
            max_size = int(max_size)
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        size = int(np.random.choice(self.short_edge_lengths))
        new_h, new_w = self.get_output_shape(h, w, size, self.max_size)
        return T.ResizeTransform(h, w, new_h, new_w, Image.BILINEAR)

    @staticmethod
    def get_output_shape(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
        """Output (height, width): the official ``get_size_with_aspect_ratio``, rule for rule."""
        if max_size is not None:
            min_original_size = float(min(w, h))
            max_original_size = float(max(w, h))
            if max_original_size / min_original_size * size > max_size:
                # Python's round (half to even), as in the official code.
                size = int(round(max_size * min_original_size / max_original_size))
        if (w <= h and w == size) or (h <= w and h == size):
            return h, w
        if w < h:
            return int(size * h / w), size
        return size, int(size * w / h)


class RandomSizeCrop(T.Augmentation):
    """Crop a region of random size at a random position.

    Matches the official ``RandomSizeCrop(min_size, max_size)``: width and height are drawn
    independently and inclusively from ``[min_size, min(side, max_size)]``, then the top-left
    corner uniformly like torchvision's ``RandomCrop.get_params``. The official code raises on
    a side shorter than ``min_size``; here that side is kept whole instead.
    """

    def __init__(self, min_size: int, max_size: int):
        """
        Args:
            min_size: smallest crop side (official: 384).
            max_size: largest crop side (official: 600).
        """
        super().__init__()
        min_size, max_size = int(min_size), int(max_size)
        if not 0 < min_size <= max_size:
            raise ValueError(f"Need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        crop_w = self._draw_side(w)
        crop_h = self._draw_side(h)
        # torchvision RandomCrop.get_params: top in [0, H - h], left in [0, W - w], inclusive.
        y0 = int(np.random.randint(0, h - crop_h + 1))
        x0 = int(np.random.randint(0, w - crop_w + 1))
        return T.CropTransform(x0, y0, crop_w, crop_h, orig_w=w, orig_h=h)

    def _draw_side(self, side: int) -> int:
        """Inclusive draw in [min_size, min(side, max_size)], the whole side if it is too short."""
        high = min(side, self.max_size)
        low = min(self.min_size, high)
        return int(np.random.randint(low, high + 1))


class RandomSelect(T.Augmentation):
    """Apply ``first`` with probability ``prob``, otherwise ``second``.

    Matches the official ``RandomSelect(transforms1, transforms2, p)``. Each branch may be a
    list applied in sequence, so, like ``AugmentationList``, it works through ``__call__``
    (later steps need the output of earlier ones) and has no ``get_transform``.
    """

    def __init__(
        self,
        first: AugOrTransform | Sequence[AugOrTransform],
        second: AugOrTransform | Sequence[AugOrTransform],
        prob: float = 0.5,
    ):
        """
        Args:
            first: augmentation(s) applied with probability ``prob``.
            second: augmentation(s) applied otherwise.
            prob: probability of choosing ``first``.
        """
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.first = self._as_list(first)
        self.second = self._as_list(second)
        self.prob = float(prob)

    @staticmethod
    def _as_list(augs: AugOrTransform | Sequence[AugOrTransform]) -> T.AugmentationList:
        if isinstance(augs, (T.Augmentation, T.Transform)):
            augs = [augs]
        return T.AugmentationList(list(augs))

    def get_transform(self, *args) -> T.Transform:
        raise NotImplementedError(
            "RandomSelect applies a sequence of augmentations; call it on an AugInput instead."
        )

    def __call__(self, aug_input: T.AugInput) -> T.TransformList:
        # Same draw as the official ``random.random() < p`` (numpy RNG, seeded by Detectron2).
        branch = self.first if self._rand_range() < self.prob else self.second
        return branch(aug_input)

    def __repr__(self) -> str:
        return f"RandomSelect(first={self.first}, second={self.second}, prob={self.prob})"

    __str__ = __repr__


def build_detr_augmentation(cfg: CfgNode, is_train: bool) -> list[T.Augmentation]:
    """The official ``make_coco_transforms`` pipeline (without normalisation) from ``cfg``; see
    :func:`detr_augmentations` (``INPUT.{MIN,MAX}_SIZE_{TRAIN,TEST}``, ``INPUT.RANDOM_FLIP``,
    ``INPUT.CROP``)."""
    if not is_train:
        return detr_augmentations(
            is_train=False, min_size=[cfg.INPUT.MIN_SIZE_TEST], max_size=cfg.INPUT.MAX_SIZE_TEST
        )
    crop = cfg.INPUT.CROP
    if crop.ENABLED and crop.TYPE != "absolute_range":
        # The official crop samples absolute side lengths; other types mean other things.
        raise ValueError(f"DETR's crop needs INPUT.CROP.TYPE 'absolute_range', got {crop.TYPE!r}")
    return detr_augmentations(
        is_train=True,
        min_size=cfg.INPUT.MIN_SIZE_TRAIN,
        max_size=cfg.INPUT.MAX_SIZE_TRAIN,
        flip=cfg.INPUT.RANDOM_FLIP,
        crop_pre_resize=crop.PRE_RESIZE if crop.ENABLED else None,
        crop_size=crop.SIZE if crop.ENABLED else None,
    )


def detr_augmentations(
    *,
    is_train: bool,
    min_size: Sequence[int],
    max_size: int,
    flip: str = "horizontal",
    crop_pre_resize: Sequence[int] | None = None,
    crop_size: Sequence[int] | None = None,
) -> list[T.Augmentation]:
    """The official pipeline from explicit values (for LazyConfigs too).

    Train: random flip, then either a multi-scale resize (shorter side one of ``min_size``,
    longer side at most ``max_size``), or (with ``crop_pre_resize``, probability 0.5) resize to
    one of ``crop_pre_resize`` without a size cap, random-size crop (``crop_size`` = [min, max]
    side), multi-scale resize. Test: resize the shorter side to ``min_size[0]``, capped at
    ``max_size``. Pixel normalisation is left to the model, as in Detectron2.
    """
    if not is_train:
        return [DetrResizeShortestEdge(list(min_size)[:1], max_size)]
    augs: list[T.Augmentation] = []
    if flip != "none":
        if flip not in ("horizontal", "vertical"):
            raise ValueError(f"Unknown INPUT.RANDOM_FLIP: {flip!r}")
        augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
    if crop_pre_resize:
        min_crop, max_crop = crop_size
        crop = [
            DetrResizeShortestEdge(crop_pre_resize),  # official: no max size
            RandomSizeCrop(min_crop, max_crop),
            DetrResizeShortestEdge(min_size, max_size),
        ]
        augs.append(RandomSelect(DetrResizeShortestEdge(min_size, max_size), crop))
    else:
        augs.append(DetrResizeShortestEdge(min_size, max_size))
    return augs
