"""Evaluators for each dataset ``evaluator_type`` (``EVALUATORS``), and the COCOeval backend
they compute box and mask AP with (``TEST.COCO_EVAL_BACKEND``)."""

import importlib.metadata
import json
import logging
import os
from collections.abc import Callable

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    coco_evaluation,
)
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_first_n

from .compat import detectron2_takes_cocoeval_fn

logger = logging.getLogger(__name__)

COCO_EVAL_BACKENDS = ("auto", "faster_coco_eval", "pycocotools")


def cocoeval_class(cfg: CfgNode) -> type:
    """The COCOeval class that ``TEST.COCO_EVAL_BACKEND`` selects: faster-coco-eval's C++
    ``COCOeval_faster`` (pycocotools' numbers, several times faster, as
    tests/test_coco_eval_backend.py checks) or pycocotools' reference ``COCOeval``. "auto" takes
    the first one when it is installed."""
    backend = cfg.TEST.COCO_EVAL_BACKEND
    if backend not in COCO_EVAL_BACKENDS:
        raise ValueError(
            f"TEST.COCO_EVAL_BACKEND={backend!r} is not a COCO evaluation backend; "
            f"choose one of {', '.join(map(repr, COCO_EVAL_BACKENDS))}."
        )
    cocoeval, reason = None, ""
    if backend != "pycocotools" and not detectron2_takes_cocoeval_fn():
        # e.g. Detectron2 v0.6 picks its COCOeval class inside _evaluate_predictions_on_coco
        message = (
            "this Detectron2's coco_evaluation._evaluate_predictions_on_coco takes no "
            "cocoeval_fn argument"
        )
        if backend == "faster_coco_eval":
            raise RuntimeError(
                f"TEST.COCO_EVAL_BACKEND='faster_coco_eval' cannot be applied: {message}. Set it "
                "'auto' or 'pycocotools'."
            )
        cocoeval, reason = coco_evaluation.COCOeval, f"; {message}"
    elif backend != "pycocotools":
        try:
            from faster_coco_eval import COCOeval_faster as cocoeval
        except ImportError as e:  # optional dependency: "auto" falls back to pycocotools
            if backend == "faster_coco_eval":
                raise ImportError(
                    f"TEST.COCO_EVAL_BACKEND='faster_coco_eval' but faster-coco-eval cannot be "
                    f"imported ({e}). Install it with `pip install faster-coco-eval` (the version "
                    "pinned in d2/requirements.txt), or set TEST.COCO_EVAL_BACKEND 'auto' or "
                    "'pycocotools'."
                ) from e
            reason = f"; faster-coco-eval is not importable ({e})"
    if cocoeval is None:
        from pycocotools.cocoeval import COCOeval as cocoeval
    name = cocoeval.__module__.split(".")[0]
    log_first_n(
        logging.INFO,
        f"COCO evaluation with {name} {_installed_version(name)} "
        f"(TEST.COCO_EVAL_BACKEND={backend!r}{reason}).",
        name=logger.name,
        key="message",
    )
    return cocoeval


def _installed_version(distribution: str) -> str:
    """The version to log, so that logged AP values can be traced to the code that computed them."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # importable from a source tree, unversioned
        return "(version unknown)"


class BackendCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` (box and mask AP, per-category AP) computed with the given
    COCOeval class (see :func:`cocoeval_class`) instead of the pycocotools one Detectron2 imports.

    ``max_dets_per_image`` other than 100 makes Detectron2 evaluate with its own pycocotools
    subclass whatever the backend; DETR predicts at most 100 boxes (the COCO default)."""

    def __init__(self, dataset_name: str, *, cocoeval: type, **kwargs):
        # use_fast_impl=False: Detectron2's own fast COCOeval needs its compiled _C module
        super().__init__(dataset_name, use_fast_impl=False, **kwargs)
        self._cocoeval = cocoeval

    def _eval_predictions(self, predictions, img_ids=None):
        """Fill ``self._results`` with each task's AP, computed with ``self._cocoeval``: the
        steps of Detectron2's method (results in dataset category ids, saved as
        ``coco_instances_results.json``, then each task through Detectron2's
        ``_evaluate_predictions_on_coco`` and ``_derive_coco_results``), for the tasks DETR has
        (no keypoints), with the COCOeval class passed as its ``cocoeval_fn`` argument
        (detr_d2/compat.py item 6). With pycocotools, Detectron2's method runs as it is."""
        if self._cocoeval is coco_evaluation.COCOeval:
            return super()._eval_predictions(predictions, img_ids=img_ids)
        coco_results = [result for p in predictions for result in p["instances"]]
        tasks = self._tasks or self._tasks_from_predictions(coco_results)
        to_dataset_id = {
            contiguous: dataset_id
            for dataset_id, contiguous in self._metadata.get(
                "thing_dataset_id_to_contiguous_id", {}
            ).items()
        }
        if to_dataset_id:
            for result in coco_results:
                result["category_id"] = to_dataset_id[result["category_id"]]
        if self._output_dir:
            path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info(f"Saving results to {path}")
            with PathManager.open(path, "w") as f:
                f.write(json.dumps(coco_results))
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        self._logger.info(f"Evaluating predictions with {self._cocoeval.__module__} ...")
        for task in sorted(tasks):
            assert task in ("bbox", "segm"), f"DETR predicts no {task!r}"
            coco_eval = (
                coco_evaluation._evaluate_predictions_on_coco(
                    self._coco_api,
                    coco_results,
                    task,
                    cocoeval_fn=self._cocoeval,
                    img_ids=img_ids,
                    max_dets_per_image=self._max_dets_per_image,
                )
                if coco_results  # Detectron2 leaves an empty result list unevaluated too
                else None
            )
            self._results[task] = self._derive_coco_results(
                coco_eval, task, class_names=self._metadata.get("thing_classes")
            )


class _ThingCOCOEvaluator(BackendCOCOEvaluator):
    """``BackendCOCOEvaluator`` whose per-category table is labelled with the thing classes only:
    Detectron2's standard COCO panoptic metadata lists all 133 classes in ``thing_classes``."""

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        if class_names is not None:
            thing_ids = sorted(self._metadata.thing_dataset_id_to_contiguous_id.values())
            class_names = [class_names[i] for i in thing_ids]
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)


def coco_evaluators(cfg: CfgNode, dataset_name: str, output_folder: str) -> list[DatasetEvaluator]:
    """COCO box AP, and mask AP when the model predicts masks (``MODEL.MASK_ON``)."""
    return [
        BackendCOCOEvaluator(dataset_name, output_dir=output_folder, cocoeval=cocoeval_class(cfg))
    ]


def coco_panoptic_evaluators(
    cfg: CfgNode, dataset_name: str, output_folder: str
) -> list[DatasetEvaluator]:
    """PQ (panopticapi) with ``MODEL.DETR.TEST.PANOPTIC_ON``; box and mask AP of the things with
    ``MODEL.DETR.TEST.INSTANCE_ON``, against the dataset's instances json."""
    evaluators: list[DatasetEvaluator] = []
    if cfg.MODEL.DETR.TEST.PANOPTIC_ON:
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    if cfg.MODEL.DETR.TEST.INSTANCE_ON:
        if not MetadataCatalog.get(dataset_name).get("json_file"):
            raise ValueError(
                f"MODEL.DETR.TEST.INSTANCE_ON evaluates box/mask AP, which needs an instances json "
                f"for {dataset_name!r}: give it as the fifth entry of its "
                "DATASETS.REGISTER_COCO_PANOPTIC row, or set MODEL.DETR.TEST.INSTANCE_ON False."
            )
        cocoeval = cocoeval_class(cfg)
        evaluators.append(
            _ThingCOCOEvaluator(dataset_name, output_dir=output_folder, cocoeval=cocoeval)
        )
    return evaluators


# Dataset metadata ``evaluator_type`` -> evaluators of that kind of dataset (default: COCO).
EVALUATORS: dict[str, Callable[[CfgNode, str, str], list[DatasetEvaluator]]] = {
    "coco": coco_evaluators,
    "coco_panoptic_seg": coco_panoptic_evaluators,
}
