"""One predictor for every tool: config, weights, test resize, precision, folded batch norms and
class names, in the spirit of Detectron2's ``DefaultPredictor``.

    predictor = DetrPredictor(cfg)          # cfg with add_detr_config, MODEL.WEIGHTS set
    outputs = predictor(image)              # HWC uint8 in cfg.INPUT.FORMAT -> model outputs
    names = predictor.class_names           # e.g. ["face"], from the model's class layout
"""

import logging
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, detection_utils as utils, transforms as T
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model

from .checkpoint import stored_class_layout
from .data import register_datasets_from_cfg
from .data.augmentation import DetrResizeShortestEdge, build_detr_augmentation
from .engine import build_checkpointer, resolve_device
from .errors import UserInputError
from .layout import set_layout_keys
from .modeling.inference_graph import inference_model

__all__ = ["DetrPredictor", "IMAGE_EXTENSIONS", "UnreadableImage", "list_images"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(inputs: Sequence[str]) -> list[str]:
    """Image files as given, plus the images of each folder (sorted by name). A missing path,
    or no image at all, fails naming the input."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(n for n in os.listdir(item) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                logger.warning(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in folder {item}")
            paths += [os.path.join(item, n) for n in names]
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    if not paths:
        raise FileNotFoundError(
            f"--input {list(inputs)}: no images found (extensions {IMAGE_EXTENSIONS})"
        )
    return paths


def to_8_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """16-bit ("I;16*"), 32-bit integer ("I") and float ("F") grayscale as 8-bit grayscale,
    scaled by the range of the type (16-bit: / 257) or, for "I" and "F", of the image's values
    when they exceed 8 bits; other modes as they are."""
    if image.mode.startswith("I;16"):
        return PIL.Image.fromarray(
            (np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8)
        )
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max() if values.size and values.max() > 255 else 255.0
        scaled = np.clip(values, 0, None) * (255.0 / top) if top > 0 else values
        return PIL.Image.fromarray(scaled.round().clip(0, 255).astype(np.uint8))
    return image


class UnreadableImage(UserInputError):
    """An input file that is not a readable image (empty, not an image, truncated, ...): tools
    skip it with one line naming the file and why, and go on."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class DetrPredictor:
    """Builds the model of ``cfg``, loads ``MODEL.WEIGHTS`` and runs single images through the
    test resize and the inference model (``TEST.PRECISION``, ``TEST.FOLD_BATCHNORM``).

    The class layout comes from the config's keys or datasets, else from the layout a detr_d2
    checkpoint was saved with, so a model directory (``config.yaml`` + ``model_final.pth``)
    predicts with the right names even where its datasets are not on disk.

    Attributes:
        cfg: the frozen config used; ``model``: the eval-mode model as loaded (for hooks such as
        attention capture); ``inference``: the model that runs (a folded copy by default);
        ``class_names``; ``metadata``: Detectron2 ``Metadata`` for its ``Visualizer``.
    """

    def __init__(
        self,
        cfg: CfgNode,
        *,
        load_weights: bool = True,
        backend: str = "pytorch",
        exported: str = None,
    ):
        """
        Args:
            cfg: config with :func:`add_detr_config` keys; ``MODEL.WEIGHTS`` for ``pytorch``.
            load_weights: load ``MODEL.WEIGHTS`` (off: a randomly initialised model, for tests).
            backend: "pytorch", or "torchscript" / "onnxruntime" to run the export of
                ``tools/export_model.py`` in the folder ``exported`` (same outputs and drawing).
        """
        if backend != "pytorch":
            load_weights = False  # the export carries its weights
        cfg = cfg.clone()
        cfg.defrost()
        resolve_device(cfg)
        try:
            register_datasets_from_cfg(cfg)
        except (FileNotFoundError, ValueError) as e:  # only names and colours come from them
            logger.warning(f"Datasets of the config are not available ({e}).")
        detr = cfg.MODEL.DETR
        if load_weights and not (detr.CLASS_NAMES or detr.CLASS_IS_THING or detr.CLASS_DATASET_IDS):
            stored = stored_class_layout(cfg.MODEL.WEIGHTS)
            if stored is not None and stored.num_classes == detr.NUM_CLASSES:
                set_layout_keys(cfg, stored)
                logger.info(f"Class layout from {cfg.MODEL.WEIGHTS}: {', '.join(stored.names)}")
        cfg.freeze()
        self.cfg = cfg
        self.model = build_model(cfg).eval()
        if load_weights and cfg.MODEL.WEIGHTS:
            build_checkpointer(cfg, self.model).load(cfg.MODEL.WEIGHTS)
        elif load_weights:
            logger.warning("MODEL.WEIGHTS is empty: predicting with a randomly initialised model.")
        if backend == "pytorch":
            self.inference = inference_model(self.model, cfg)
        else:
            from .export import exported_model  # onnxruntime is only needed for exports

            self.inference = exported_model(cfg, backend, exported)
        self.augmentation = T.AugmentationList(build_detr_augmentation(cfg, is_train=False))
        self.class_names = list(self.model.class_layout.names)
        if backend != "pytorch" and self.inference.meta.get("class_names"):
            self.class_names = list(self.inference.meta["class_names"])
        self.metadata = self._metadata()

    def _metadata(self) -> Metadata:
        """Class names for every contiguous id (``thing_classes`` and ``stuff_classes`` alike, as
        the Visualizer indexes both by the model's class id), with the dataset's colours."""
        names = self.class_names
        meta = Metadata(name="detr_d2_predictor", thing_classes=names, stuff_classes=names)
        for name in self.cfg.DATASETS.TEST:
            colors = MetadataCatalog.get(name).get("stuff_colors")
            if colors and len(colors) == len(names):
                meta.set(thing_colors=colors, stuff_colors=colors)
                break
        return meta

    def read_image(self, path: str) -> np.ndarray:
        """HWC uint8 in ``INPUT.FORMAT``, read as Detectron2 reads it (EXIF orientation applied,
        grayscale, palette, RGBA and CMYK converted), except that 16-bit and 32-bit grayscale
        are scaled to 8 bits (Detectron2 clips them, which turns most of an image white). A file
        that is no readable image, or too elongated for the test resize (:meth:`size_problem`),
        raises :class:`UnreadableImage` naming it and why."""
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        try:
            with PIL.Image.open(path) as image:
                image = PIL.ImageOps.exif_transpose(image)
                image = utils.convert_PIL_to_numpy(to_8_bit(image), self.cfg.INPUT.FORMAT)
        except PIL.UnidentifiedImageError:
            raise UnreadableImage(path, "not an image PIL can read") from None
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt image data
            raise UnreadableImage(path, f"{type(e).__name__}: {e}") from None
        problem = self.size_problem(*image.shape[:2])
        if problem:
            raise UnreadableImage(path, problem)
        return image

    def size_problem(self, height: int, width: int) -> str | None:
        """Why an image of this size cannot be predicted, or ``None``. Any image of at least one
        pixel works unless the test resize (shorter side to ``INPUT.MIN_SIZE_TEST``, longer
        side at most ``INPUT.MAX_SIZE_TEST``) makes a side 0 px: an aspect ratio beyond about
        2 * MAX_SIZE_TEST : 1."""
        if min(height, width) < 1:
            return f"{height}x{width} px: no pixels"
        resized = DetrResizeShortestEdge.get_output_shape(
            height, width, self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST
        )
        if min(resized) < 1:
            return (
                f"{height}x{width} px is too elongated: the test resize (INPUT.MIN_SIZE_TEST "
                f"{self.cfg.INPUT.MIN_SIZE_TEST}, INPUT.MAX_SIZE_TEST "
                f"{self.cfg.INPUT.MAX_SIZE_TEST}) makes it {resized[0]}x{resized[1]} px; crop it"
            )
        return None

    def to_rgb(self, image: np.ndarray) -> np.ndarray:
        return utils.convert_image_to_rgb(image, self.cfg.INPUT.FORMAT)

    def model_input(self, image: np.ndarray) -> dict:
        """The model's input dict of one HWC image: resized as in evaluation, outputs at the
        original size."""
        problem = self.size_problem(*image.shape[:2])
        if problem:
            raise UserInputError(f"image of {problem}")
        aug_input = T.AugInput(image)
        self.augmentation(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> dict:
        """Outputs of one HWC uint8 image in ``INPUT.FORMAT`` (see ``Detr.inference``)."""
        return self.inference([self.model_input(image)])[0]

    def class_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class {label}"
