"""Turn a Detectron2 dataset dict into DETR's training/inference input."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils, transforms as T
from detectron2.structures import BitMasks, Instances, polygons_to_bitmask

from .augmentation import build_detr_augmentation
from .panoptic import check_panoptic_ids, panoptic_to_instances, rgb2id

__all__ = ["DetrDatasetMapper"]

logger = logging.getLogger(__name__)


def read_image_checked(file_name: str, image_format: str, image_id: Any = None) -> np.ndarray:
    """``detection_utils.read_image`` (EXIF orientation applied; grayscale, palette, RGBA and CMYK
    converted to ``image_format``) with errors that name the image id and the file."""
    try:
        return utils.read_image(file_name, format=image_format)
    except FileNotFoundError:
        raise FileNotFoundError(f"image id {image_id}: file not found: {file_name}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified, truncated, corrupt data
        raise OSError(f"image id {image_id}: cannot read {file_name}: {e}") from None


class DetrDatasetMapper:
    """Read an image, apply DETR's augmentations and build its ``Instances``.

    Like Detectron2's ``DatasetMapper``, but with the official DETR pipeline (see
    :func:`build_detr_augmentation`) and its target rules: crowd boxes are dropped and boxes
    emptied by a crop are removed. Images without annotations stay valid training samples with
    empty ``Instances``, since DETR's set loss then only asks for "no object" everywhere.

    Two kinds of records: COCO instance records (``annotations``) and COCO panoptic records
    (``pan_seg_file_name`` + ``segments_info``, as Detectron2's panoptic datasets), whose
    targets are the non-crowd segments of the augmented panoptic PNG (things and stuff alike).

    Output dict: ``image`` (uint8 CHW tensor in ``image_format``), ``height``/``width`` (the
    original size, for postprocessing) and, in training, ``instances`` with ``gt_boxes``
    (XYXY absolute pixels of the augmented image), ``gt_classes`` and, with ``mask_on``,
    ``gt_masks`` (``BitMasks`` of the augmented image).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list[T.Augmentation | T.Transform],
        image_format: str,
        mask_on: bool = False,
    ):
        """
        Args:
            is_train: whether to produce training targets (else annotations are dropped).
            augmentations: augmentations or deterministic transforms applied in order.
            image_format: a format accepted by ``detection_utils.read_image``; "RGB" for DETR.
            mask_on: also produce ``gt_masks`` (from polygons, RLE or panoptic PNGs).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.mask_on = mask_on
        mode = "training" if is_train else "inference"
        logger.info(f"[DetrDatasetMapper] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_detr_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "mask_on": cfg.MODEL.MASK_ON,
        }

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        """Map one dataset dict (Detectron2 format) to one model input dict."""
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below; the dataset keeps its own
        image = read_image_checked(
            dataset_dict["file_name"], self.image_format, dataset_dict.get("image_id")
        )
        utils.check_image_size(dataset_dict, image)

        original_shape = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # (h, w)
        # A tensor (not a numpy array) travels cheaply through the DataLoader's shared memory.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict

        if "pan_seg_file_name" in dataset_dict:
            dataset_dict["instances"] = self._panoptic_targets(dataset_dict, transforms)
            return dataset_dict
        dataset_dict["instances"] = self._transform_annotations(
            dataset_dict.pop("annotations", []), transforms, image_shape, original_shape
        )
        return dataset_dict

    def _panoptic_targets(
        self, dataset_dict: dict[str, Any], transforms: T.TransformList
    ) -> Instances:
        """One target per non-crowd segment of the augmented panoptic PNG (official DETR trains
        on things and stuff alike)."""
        # The RGB-encoded PNG goes through the transforms (nearest for segmentations) before
        # decoding, so that no interpolation ever mixes two segment ids.
        file_name = dataset_dict.pop("pan_seg_file_name")
        pan_rgb = read_image_checked(file_name, "RGB", dataset_dict.get("image_id"))
        check_panoptic_ids(
            rgb2id(pan_rgb), dataset_dict["segments_info"], file_name, dataset_dict.get("image_id")
        )
        segment_ids = rgb2id(transforms.apply_segmentation(pan_rgb))
        return panoptic_to_instances(segment_ids, dataset_dict.pop("segments_info"), self.mask_on)

    def _transform_annotations(
        self,
        annotations: list[dict[str, Any]],
        transforms: T.TransformList,
        image_shape: tuple[int, int],
        original_shape: tuple[int, int],
    ) -> Instances:
        """Targets of the augmented image, following the official ``ConvertCocoPolysToMask``
        and ``crop`` rules."""
        annos, masks = [], []
        for anno in annotations:
            # Official DETR trains without crowd regions.
            if anno.get("iscrowd", 0) != 0:
                continue
            segmentation = anno.pop("segmentation", None)
            anno.pop("keypoints", None)  # no keypoint head
            if self.mask_on:
                # As the official ConvertCocoPolysToMask: rasterize polygons / RLE at the
                # original size, then transform the bitmap like the image (no polygon clipping).
                mask = _rasterize(segmentation, anno, original_shape)
                masks.append(transforms.apply_segmentation(mask))
            # The box is transformed through its corners, then clipped to the augmented image:
            # the official code clamps boxes to the image on loading and to the crop window
            # when cropping; flips and resizes keep boxes inside, so one clip at the end is
            # the same.
            annos.append(utils.transform_instance_annotations(anno, transforms, image_shape))
        instances = utils.annotations_to_instances(annos, image_shape)
        if self.mask_on:
            stacked = np.stack(masks) if masks else np.zeros((0, *image_shape), dtype=np.uint8)
            instances.gt_masks = BitMasks(torch.from_numpy(np.ascontiguousarray(stacked)).bool())
        # Official DETR drops boxes with zero width or height, both degenerate ones on loading
        # and those a crop cuts out (and, with masks, instances whose mask a crop emptied).
        return utils.filter_empty_instances(instances)


def _rasterize(segmentation: Any, anno: dict[str, Any], image_shape: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W] mask of a COCO segmentation: polygons, RLE (compressed or not) or a bitmap."""
    height, width = image_shape
    if segmentation is None:
        raise ValueError(
            f"MODEL.MASK_ON needs a 'segmentation' in every annotation; annotation "
            f"{anno.get('id')} (image of size {height}x{width}) has none. Add masks or set "
            "MODEL.MASK_ON False."
        )
    if isinstance(segmentation, list):
        polygons = [np.asarray(p, dtype=np.float64) for p in segmentation]
        return polygons_to_bitmask(polygons, height, width).astype(np.uint8)
    if isinstance(segmentation, dict):
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            segmentation = mask_util.frPyObjects(segmentation, *segmentation["size"])
        return mask_util.decode(segmentation).astype(np.uint8)
    return np.asarray(segmentation, dtype=np.uint8)
