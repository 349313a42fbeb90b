"""Turn a Detectron2 dataset dict into DETR's training/inference input."""

from __future__ import annotations

import copy
import logging
from typing import Any, Union

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from .augmentation import build_detr_augmentation

__all__ = ["DetrDatasetMapper"]

logger = logging.getLogger(__name__)


class DetrDatasetMapper:
    """Read an image, apply DETR's augmentations and build its ``Instances``.

    Like Detectron2's ``DatasetMapper``, but with the official DETR pipeline (see
    :func:`build_detr_augmentation`) and its target rules: crowd boxes are dropped and boxes
    emptied by a crop are removed. Images without annotations stay valid training samples with
    empty ``Instances``, since DETR's set loss then only asks for "no object" everywhere.

    Output dict: ``image`` (uint8 CHW tensor in ``image_format``), ``height``/``width`` (the
    original size, for postprocessing) and, in training, ``instances`` with ``gt_boxes``
    (XYXY absolute pixels of the augmented image) and ``gt_classes``.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list[Union[T.Augmentation, T.Transform]],
        image_format: str,
    ):
        """
        Args:
            is_train: whether to produce training targets (else annotations are dropped).
            augmentations: augmentations or deterministic transforms applied in order.
            image_format: a format accepted by ``detection_utils.read_image``; "RGB" for DETR.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        mode = "training" if is_train else "inference"
        logger.info(f"[DetrDatasetMapper] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_detr_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        """Map one dataset dict (Detectron2 format) to one model input dict."""
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below; the dataset keeps its own
        # read_image applies the EXIF orientation and converts e.g. RGBA/grayscale to RGB.
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # (h, w)
        # A tensor (not a numpy array) travels cheaply through the DataLoader's shared memory.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict

        dataset_dict["instances"] = self._transform_annotations(
            dataset_dict.pop("annotations", []), transforms, image_shape
        )
        return dataset_dict

    def _transform_annotations(
        self,
        annotations: list[dict[str, Any]],
        transforms: T.TransformList,
        image_shape: tuple[int, int],
    ) -> Instances:
        """Targets of the augmented image, following the official ``ConvertCocoPolysToMask``
        and ``crop`` rules."""
        annos = []
        for anno in annotations:
            # Official DETR trains without crowd regions.
            if anno.get("iscrowd", 0) != 0:
                continue
            # No mask/keypoint heads yet: drop them so polygons are not transformed for nothing.
            # (A future ``mask_on`` flag would keep "segmentation" and build ``gt_masks``.)
            anno.pop("segmentation", None)
            anno.pop("keypoints", None)
            # The box is transformed through its corners, then clipped to the augmented image:
            # the official code clamps boxes to the image on loading and to the crop window
            # when cropping; flips and resizes keep boxes inside, so one clip at the end is
            # the same.
            annos.append(utils.transform_instance_annotations(anno, transforms, image_shape))
        instances = utils.annotations_to_instances(annos, image_shape)
        # Official DETR drops boxes with zero width or height, both degenerate ones on loading
        # and those a crop cuts out.
        return utils.filter_empty_instances(instances)
