"""Training-only cache of the frozen backbone stages' output, one entry per augmented view.

Why: with ``MODEL.BACKBONE.FREEZE_AT`` the first stages of the backbone are a fixed function of
the input, and fine-tuning shows them every image again at every epoch. With a bounded set of
augmented views (flip x the short-side sizes of ``INPUT.MIN_SIZE_TRAIN``, no random crop), a view
seen before skips those stages: their output comes from memory, and only the trained stages run.

How: the frozen stages run per image, on the image padded only to the size divisibility, so a
view's features do not depend on its batch neighbours. The key is the view's exact content (a
digest of the normalised pixels' bytes, their shape) and the autocast dtype, so a hit is the
same input by construction, whatever the augmentation did. A batch stacks the cached maps,
zero-padded to the largest, and the trained stages run on it as without the cache. The cache is
no module and holds nothing that resuming needs (a resumed run computes the same values again):
checkpoint keys, the optimizer, evaluation and inference see the model as it is.

The losses equal the uncached path's wherever the images of a batch have the same padded size.
Where they differ, the uncached path runs the frozen stages on the padded batch, and a smaller
image's border features see the activations of its padding; with the cache they see zeros, as a
single image does (the transformer's padding mask hides the padded positions either way).
"""

import hashlib
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.data import get_detection_dataset_dicts
from detectron2.modeling.backbone.resnet import ResNet
from detectron2.structures import ImageList
from torch import nn

from ..data.augmentation import DetrResizeShortestEdge
from ..precision import precision_dtype
from .backbone import TRAIN_SIZE_DIVISIBILITY
from .frozen_backbone import FoldedBackbone, has_foldable_frozen_part, weights_key

logger = logging.getLogger(__name__)

__all__ = ["FeatureCache", "check_feature_cache", "frozen_stages"]

_GB = 1e9


def frozen_stages(backbone: nn.Module) -> list[str]:
    """Names of the leading parts of a Detectron2 ``ResNet`` (``stem``, ``res2``, ...) that have
    no trainable parameter: what ``MODEL.BACKBONE.FREEZE_AT`` froze. Empty for other backbones."""
    if not isinstance(backbone, ResNet) or backbone.num_classes is not None:
        return []
    names = []
    for name in ("stem", *backbone.stage_names):
        if any(p.requires_grad for p in getattr(backbone, name).parameters()):
            break
        names.append(name)
    return names


def _cached_names(backbone: ResNet, frozen: Sequence[str]) -> list[str]:
    """The frozen outputs the model uses: the last frozen stage's (the first trained stage's
    input) and any frozen stage among the backbone's outputs (e.g. res2-res4 for masks)."""
    return [n for n in frozen if n == frozen[-1] or n in backbone._out_features]


def _autocast_state(device_type: str) -> torch.dtype | None:
    """The dtype the frozen stages compute in: autocast's, or None outside autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _stack_padded(maps: list[torch.Tensor]) -> torch.Tensor:
    """[1, C, h_i, w_i] maps -> [N, C, H, W], zero-padded at the bottom and right."""
    height = max(m.shape[-2] for m in maps)
    width = max(m.shape[-1] for m in maps)
    padded = [
        m
        if m.shape[-2:] == (height, width)
        else F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2]))
        for m in maps
    ]
    batch = torch.cat(padded)
    if maps[0].is_contiguous(memory_format=torch.channels_last):
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


class FeatureCache:
    """Callable ``(backbone, folded, images) -> features`` (the backbone's outputs, as
    ``backbone(images.tensor)`` returns them) in training, with the frozen stages' output of
    each view computed once (``MODEL.DETR.SPEED.FEATURE_CACHE``)."""

    def __init__(self, *, max_bytes: int):
        """
        Args:
            max_bytes: memory budget; the cache never holds more (later views are computed
                each time, with one warning).
        """
        self.max_bytes = int(max_bytes)
        self._entries: dict[tuple, dict[str, torch.Tensor]] = {}
        self._weights: tuple | None = None
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._warned_full = False

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "FeatureCache | None":
        """The cache of ``MODEL.DETR.SPEED.FEATURE_CACHE``, or None when it is off."""
        node = cfg.MODEL.DETR.SPEED.FEATURE_CACHE
        if not node.ENABLED:
            return None
        if cfg.INPUT.CROP.ENABLED:
            raise ValueError(
                "MODEL.DETR.SPEED.FEATURE_CACHE.ENABLED needs a bounded set of augmented views, but "
                "INPUT.CROP.ENABLED is True: random crops make a new view at every epoch, which "
                "a cache cannot reuse. Set INPUT.CROP.ENABLED False or "
                "MODEL.DETR.SPEED.FEATURE_CACHE.ENABLED False."
            )
        if node.MAX_MEMORY_GB <= 0:
            raise ValueError(
                f"MODEL.DETR.SPEED.FEATURE_CACHE.MAX_MEMORY_GB must be > 0, got {node.MAX_MEMORY_GB}."
            )
        return cls(max_bytes=int(node.MAX_MEMORY_GB * _GB))

    def check_backbone(self, backbone: nn.Module) -> None:
        """Raise ValueError unless ``backbone`` is a ResNet with frozen leading stages."""
        if not frozen_stages(backbone):
            raise ValueError(
                "MODEL.DETR.SPEED.FEATURE_CACHE.ENABLED caches the frozen stages of a ResNet backbone, "
                f"but {type(backbone).__name__} has none (MODEL.BACKBONE.FREEZE_AT "
                "0, or not a ResNet): freeze stages with MODEL.BACKBONE.FREEZE_AT >= 1, or set "
                "MODEL.DETR.SPEED.FEATURE_CACHE.ENABLED False."
            )

    def __deepcopy__(self, memo) -> "FeatureCache":
        # copies of the model (EMA, inference graph) start empty instead of copying gigabytes
        return FeatureCache(max_bytes=self.max_bytes)

    def __repr__(self) -> str:
        return (
            f"FeatureCache({len(self._entries)} views, {self.bytes / _GB:.2f} of "
            f"{self.max_bytes / _GB:.2f} GB, {self.hits} hits, {self.misses} misses)"
        )

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
        self._warned_full = False

    def __call__(
        self, backbone: ResNet, folded: FoldedBackbone, images: ImageList
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            backbone: the model's backbone (a ResNet whose first stages are frozen).
            folded: the model's folded copy of it, used when the backbone has one (the frozen
                stages then run with folded batch norms, as without the cache).
            images: the normalised training batch, padded to ``images.tensor`` [N, 3, H, W].
        Returns:
            the backbone's outputs (``backbone.output_shape()`` names), for the whole batch.
        """
        key = weights_key(backbone)
        if key != self._weights:  # new frozen weights (a checkpoint load) or a move
            self.clear()
            self._weights = key
        network = folded.network(backbone) if has_foldable_frozen_part(backbone) else backbone
        frozen = frozen_stages(network)
        assert frozen, "the feature cache needs frozen backbone stages (check_backbone)"
        # each image padded as the training batches are (Detr.preprocess_image)
        divisibility = max(backbone.size_divisibility, TRAIN_SIZE_DIVISIBILITY)
        per_image = []
        for index, (height, width) in enumerate(images.image_sizes):
            if divisibility > 1:
                height = math.ceil(height / divisibility) * divisibility
                width = math.ceil(width / divisibility) * divisibility
            pixels = images.tensor[index : index + 1, :, :height, :width]  # [1, 3, h, w]
            per_image.append(self._frozen_features(network, frozen, pixels, folded.channels_last))
        batch = {name: _stack_padded([f[name] for f in per_image]) for name in per_image[0]}
        outputs = {name: value for name, value in batch.items() if name in network._out_features}
        x = batch[frozen[-1]]
        for name, stage in zip(network.stage_names, network.stages):
            if name in frozen:
                continue
            x = stage(x)
            if name in network._out_features:
                outputs[name] = x
        return outputs

    def _frozen_features(
        self, network: ResNet, frozen: list[str], pixels: torch.Tensor, channels_last: bool
    ) -> dict[str, torch.Tensor]:
        """The cached outputs of the frozen stages for one view [1, 3, h, w] (on channels-last
        pixels when the model's backbone is channels-last)."""
        pixels = pixels.contiguous()
        digest = hashlib.blake2b(pixels.cpu().view(torch.uint8).numpy(), digest_size=16)
        key = (tuple(pixels.shape), _autocast_state(pixels.device.type), digest.digest())
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            return entry
        self.misses += 1
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        wanted = _cached_names(network, frozen)
        entry = {}
        with torch.no_grad():
            x = pixels
            for name in frozen:
                x = getattr(network, name)(x)
                if name in wanted:
                    entry[name] = x
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if self.bytes + size <= self.max_bytes:
            self._entries[key] = entry
            self.bytes += size
        elif not self._warned_full:
            self._warned_full = True
            logger.warning(
                f"Feature cache full ({self.bytes / _GB:.2f} GB, "
                "MODEL.DETR.SPEED.FEATURE_CACHE.MAX_MEMORY_GB): views not cached yet run the frozen "
                "stages every time."
            )
        return entry


def _view_shapes(record: dict, sizes: Sequence[int], max_size: int, divisibility: int):
    """(height, width) of each resized view of a dataset record, padded to ``divisibility``."""
    for size in sizes:
        height, width = DetrResizeShortestEdge.get_output_shape(
            record["height"], record["width"], size, max_size
        )
        if divisibility > 1:
            height = math.ceil(height / divisibility) * divisibility
            width = math.ceil(width / divisibility) * divisibility
        yield height, width


def check_feature_cache(
    cfg: CfgNode, model: nn.Module, dataset_dicts: list[dict] | None = None
) -> None:
    """At the start of training: estimate the memory the cache of ``model`` (if any) needs for
    every view of ``dataset_dicts`` (default: those of ``DATASETS.TRAIN``), log it, and raise
    ValueError naming ``MODEL.DETR.SPEED.FEATURE_CACHE.MAX_MEMORY_GB`` when it exceeds the budget."""
    cache = getattr(model, "feature_cache", None)
    if cache is None:
        return
    if dataset_dicts is None:
        dataset_dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
    backbone = model.backbone
    frozen = frozen_stages(backbone)
    names = _cached_names(backbone, frozen)
    device_type = torch.device(cfg.MODEL.DEVICE).type
    dtype = torch.float32
    if cfg.SOLVER.AMP.ENABLED:
        dtype = precision_dtype(cfg.SOLVER.AMP.PRECISION, "SOLVER.AMP.PRECISION", device_type)
    element_size = torch.empty((), dtype=dtype).element_size()
    sizes = sorted(set(cfg.INPUT.MIN_SIZE_TRAIN))
    flips = 1 if cfg.INPUT.RANDOM_FLIP == "none" else 2
    divisibility = max(backbone.size_divisibility, TRAIN_SIZE_DIVISIBILITY)
    total = 0
    for record in dataset_dicts:
        for height, width in _view_shapes(record, sizes, cfg.INPUT.MAX_SIZE_TRAIN, divisibility):
            for name in names:
                stride = backbone._out_feature_strides[name]
                channels = backbone._out_feature_channels[name]
                area = math.ceil(height / stride) * math.ceil(width / stride)
                total += flips * channels * area * element_size
    views = len(dataset_dicts) * len(sizes) * flips
    message = (
        f"Feature cache (MODEL.DETR.SPEED.FEATURE_CACHE): {views} views ({len(dataset_dicts)} images x "
        f"{len(sizes)} sizes x {flips} flips) of {'+'.join(names)} in {str(dtype)[6:]}: "
        f"{total / _GB:.2f} GB at most, budget {cache.max_bytes / _GB:.2f} GB."
    )
    if total > cache.max_bytes:
        raise ValueError(
            f"{message} It does not fit: raise MODEL.DETR.SPEED.FEATURE_CACHE.MAX_MEMORY_GB if the "
            "machine has the memory, make fewer views (INPUT.MIN_SIZE_TRAIN sizes, "
            "INPUT.RANDOM_FLIP), or set MODEL.DETR.SPEED.FEATURE_CACHE.ENABLED False."
        )
    logger.info(message)
