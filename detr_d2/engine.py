"""Detectron2 ``DefaultTrainer`` for DETR: its optimizer, mapper, evaluator and checkpointer."""
import logging
import os
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator

from .checkpoint import DetrCheckpointer
from .data import DetrDatasetMapper, coco_class_rows, drop_degenerate_boxes
from .solver import build_detr_optimizer

logger = logging.getLogger(__name__)


def resolve_device(cfg: CfgNode) -> None:
    """Fall back to the CPU (with a log line) when ``MODEL.DEVICE`` asks for CUDA but none is
    available, so configs written for GPUs run on laptops and CI machines as they are."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available: running on CPU.")
        cfg.MODEL.DEVICE = "cpu"
    logger.info(f"Running on {cfg.MODEL.DEVICE} with {torch.get_num_threads()} CPU threads.")


def build_checkpointer(cfg: CfgNode, model, **checkpointables) -> DetrCheckpointer:
    """The checkpointer every entry point uses, so official files load the same way everywhere."""
    return DetrCheckpointer(model, cfg.OUTPUT_DIR, class_rows=coco_class_rows(cfg), **checkpointables)


class DetrTrainer(DefaultTrainer):
    """``DefaultTrainer`` with DETR's optimizer, data mapper, COCO evaluation and checkpoint
    loader; everything else (hooks, schedule, logging) is Detectron2's."""

    def __init__(self, cfg: CfgNode):
        super().__init__(cfg)
        self.checkpointer = build_checkpointer(cfg, self._trainer.model, trainer=weakref.proxy(self))
        for hook in self._hooks:  # the periodic checkpointer was built with the default one
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model) -> torch.optim.Optimizer:
        return build_detr_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        dataset = drop_degenerate_boxes(dataset, ", ".join(cfg.DATASETS.TRAIN))
        return build_detection_train_loader(cfg, dataset=dataset, mapper=DetrDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # the pure-Python COCOeval: Detectron2's fast C++ variant needs its compiled _C module
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)
