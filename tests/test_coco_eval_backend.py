"""TEST.COCO_EVAL_BACKEND: faster-coco-eval gives pycocotools' COCO metrics (stats, per-category
AP, the evaluator's result dict) on a generated dataset with crowd regions, objects of all three
COCO sizes, empty images and noisy, tied-score predictions; and the backend choice."""

import contextlib
import copy
import io
import json
import math
import sys
from unittest import mock

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import coco_evaluation
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_d2.evaluation import (
    BackendCOCOEvaluator,
    _ThingCOCOEvaluator,
    coco_evaluators,
    coco_panoptic_evaluators,
    cocoeval_class,
)

from helpers import make_cfg

# category 9 has predictions but no ground truth, category 11 ground truth but no predictions
CATEGORIES = [(1, "person"), (3, "car"), (7, "dog"), (9, "kite"), (11, "boat")]
SIDES = {"small": (6, 30), "medium": (34, 90), "large": (100, 200)}  # COCO: 32**2 < medium < 96**2


def _polygon(x, y, w, h, rng):
    """A jagged ellipse in the box (x, y, w, h), as a COCO polygon list."""
    t = np.sort(rng.uniform(0, 2 * np.pi, 12))
    r = rng.uniform(0.75, 1.0, 12)
    points = np.stack([x + w / 2 * (1 + r * np.cos(t)), y + h / 2 * (1 + r * np.sin(t))], 1)
    return [points.ravel().round(2).tolist()]


def _uncompressed_rle(rle):
    """COCO's crowd format: column-major run lengths as a list, starting with a 0-run."""
    flat = mask_util.decode(rle).ravel(order="F")
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 0]))
    return {"counts": np.diff(np.r_[0, changes, flat.size]).tolist(), "size": rle["size"]}


def _prediction(image_id, category_id, box, polygon, height, width, rng):
    rle = mask_util.merge(mask_util.frPyObjects(polygon, height, width))
    rle["counts"] = rle["counts"].decode("utf-8")  # as Detectron2's instances_to_coco_json
    # two decimals: many tied scores, where a different sort order would change AP
    score = round(float(rng.uniform(0.05, 1.0)), 2)
    box = [float(v) for v in box]
    return {
        "image_id": image_id,
        "category_id": category_id,
        "bbox": box,
        "score": score,
        "segmentation": rle,
    }


def coco_dataset(seed, num_images=40):
    """(ground truth dict, predictions in COCO result format with box and RLE mask)."""
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(220, 320)), int(rng.integers(220, 320))
        images.append(
            {"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"}
        )
        num_objects = 0 if image_id % 5 == 0 else int(rng.integers(1, 8))  # every 5th image: empty
        for _ in range(num_objects):
            w, h = rng.uniform(*SIDES[rng.choice(list(SIDES))], size=2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category_id = int(rng.choice([1, 3, 7, 11] if image_id % 4 == 0 else [1, 3, 7]))
            polygon = _polygon(x, y, w, h, rng)
            rle = mask_util.merge(mask_util.frPyObjects(polygon, height, width))
            box = mask_util.toBbox(rle)
            crowd = len(annotations) % 7 == 3
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "iscrowd": int(crowd),
                    "segmentation": _uncompressed_rle(rle) if crowd else polygon,
                    "area": float(mask_util.area(rle)),
                    "bbox": box.tolist(),
                }
            )
            if category_id == 11:
                continue
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):  # missed, found, found twice
                noise = rng.normal(0, 0.08, 4) * box[[2, 3, 2, 3]]
                shifted = [
                    (np.array(p).reshape(-1, 2) + noise[:2]).ravel().tolist() for p in polygon
                ]
                label = category_id if rng.random() < 0.85 else int(rng.choice([1, 3, 7, 9]))
                predictions.append(
                    _prediction(image_id, label, box + noise, shifted, height, width, rng)
                )
        # false positives; image 1 gets more than the 100 detections COCO keeps per category
        for _ in range(120 if image_id == 1 else int(rng.integers(0, 6))):
            w, h = rng.uniform(5, 150, 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            label = 1 if image_id == 1 else int(rng.choice([1, 3, 7, 9]))
            polygon = _polygon(x, y, w, h, rng)
            predictions.append(
                _prediction(image_id, label, [x, y, w, h], polygon, height, width, rng)
            )
    categories = [{"id": i, "name": name} for i, name in CATEGORIES]
    return {"images": images, "annotations": annotations, "categories": categories}, predictions


def _coco(gt):
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def assert_metrics_equal(actual, expected, atol=1e-6):
    """Metric dicts equal to ``atol``, NaN equal to NaN; names the differing metric."""
    assert actual.keys() == expected.keys(), (
        f"metrics differ: {sorted(actual)} vs {sorted(expected)}"
    )
    for key in expected:
        a, b = actual[key], expected[key]
        if isinstance(b, dict):
            assert_metrics_equal(a, b, atol)
        else:
            same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=0, abs_tol=atol)
            assert same, f"{key}: {a} != {b}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A registered COCO-format dataset (name, ground truth, predictions)."""
    gt, predictions = coco_dataset(seed=0)
    json_file = tmp_path_factory.mktemp("coco_eval_backend") / "instances.json"
    json_file.write_text(json.dumps(gt))
    name = "coco_eval_backend_test"
    MetadataCatalog.get(name).set(
        json_file=str(json_file),
        thing_classes=[category_name for _, category_name in CATEGORIES],
        thing_dataset_id_to_contiguous_id={i: k for k, (i, _) in enumerate(CATEGORIES)},
        evaluator_type="coco",
    )
    yield name, gt, predictions
    MetadataCatalog.remove(name)


def _instances(predictions, image):
    """The model outputs Detectron2's COCOEvaluator turns back into ``predictions``."""
    contiguous = {i: k for k, (i, _) in enumerate(CATEGORIES)}
    instances = Instances((image["height"], image["width"]))
    boxes = torch.tensor([p["bbox"] for p in predictions], dtype=torch.float64).reshape(-1, 4)
    instances.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS).float())
    instances.scores = torch.tensor([p["score"] for p in predictions], dtype=torch.float32)
    instances.pred_classes = torch.tensor(
        [contiguous[p["category_id"]] for p in predictions]
    ).long()
    rles = [
        {**p["segmentation"], "counts": p["segmentation"]["counts"].encode()} for p in predictions
    ]
    masks = [mask_util.decode(rle) for rle in rles]
    shape = (len(masks), image["height"], image["width"])
    instances.pred_masks = torch.as_tensor(np.array(masks, dtype=bool)).reshape(shape)
    return instances


def _evaluate(evaluator, gt, predictions):
    evaluator.reset()
    for image in gt["images"]:
        on_image = [p for p in predictions if p["image_id"] == image["id"]]
        evaluator.process([{"image_id": image["id"]}], [{"instances": _instances(on_image, image)}])
    return evaluator.evaluate()


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_matches_pycocotools(dataset, iou_type):
    faster_coco_eval = pytest.importorskip("faster_coco_eval")
    name, gt, predictions = dataset
    thing_classes = MetadataCatalog.get(name).thing_classes
    coco_eval, per_category = {}, {}
    for backend, cocoeval in [
        ("pycocotools", COCOeval),
        ("faster", faster_coco_eval.COCOeval_faster),
    ]:
        # the call BackendCOCOEvaluator._eval_predictions makes, with each backend's class
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval[backend] = coco_evaluation._evaluate_predictions_on_coco(
                _coco(gt), copy.deepcopy(predictions), iou_type, cocoeval_fn=cocoeval
            )
        evaluator = BackendCOCOEvaluator(name, cocoeval=cocoeval, distributed=False)
        per_category[backend] = evaluator._derive_coco_results(
            coco_eval[backend], iou_type, thing_classes
        )

    reference, fast = coco_eval["pycocotools"], coco_eval["faster"]
    assert len(reference.stats) == len(fast.stats) == 12
    np.testing.assert_allclose(fast.stats, reference.stats, rtol=0, atol=1e-6)
    for key in ("precision", "recall", "scores"):  # [T, R, K, A, M], [T, K, A, M], [T, R, K, A, M]
        np.testing.assert_allclose(
            fast.eval[key], reference.eval[key], rtol=0, atol=1e-12, err_msg=key
        )
    assert_metrics_equal(per_category["faster"], per_category["pycocotools"])

    # the data exercises what it should: every area range, and both kinds of empty category
    assert (np.asarray(reference.stats[:6]) > 0).all(), reference.stats
    assert (
        math.isnan(per_category["pycocotools"]["AP-kite"])
        and per_category["pycocotools"]["AP-boat"] == 0
    )


@pytest.mark.parametrize("build", [coco_evaluators, coco_panoptic_evaluators])
def test_evaluator_results_equal_across_backends(dataset, build, tmp_path):
    faster_coco_eval = pytest.importorskip("faster_coco_eval")
    name, gt, predictions = dataset
    expected_type = (
        _ThingCOCOEvaluator if build is coco_panoptic_evaluators else BackendCOCOEvaluator
    )
    cocoeval_faster = faster_coco_eval.COCOeval_faster
    results = {}
    # counts the evaluations that really ran in faster-coco-eval
    with mock.patch.object(
        cocoeval_faster, "summarize", autospec=True, side_effect=cocoeval_faster.summarize
    ) as faster_summaries:
        for backend in ("pycocotools", "faster_coco_eval"):
            opts = ["TEST.COCO_EVAL_BACKEND", backend, "MODEL.DETR.TEST.PANOPTIC_ON", False]
            (evaluator,) = build(make_cfg(opts=opts), name, str(tmp_path / backend))
            assert isinstance(evaluator, expected_type)
            results[backend] = _evaluate(evaluator, gt, predictions)
            # a second round on the same evaluator (whose ground truth the first one annotated)
            assert_metrics_equal(_evaluate(evaluator, gt, predictions), results[backend])
    assert faster_summaries.call_count == 4  # bbox and segm, in the two faster_coco_eval rounds

    assert set(results["pycocotools"]) == {"bbox", "segm"}
    assert len(results["pycocotools"]["segm"]) == 6 + len(CATEGORIES)  # AP..APl, AP-<category>
    assert_metrics_equal(results["faster_coco_eval"], results["pycocotools"])
    assert coco_evaluation.COCOeval is COCOeval  # Detectron2's module is left as it was


def test_backend_choice(monkeypatch):
    cfg = make_cfg(opts=["TEST.COCO_EVAL_BACKEND", "pycocotools"])
    assert cfg.TEST.COCO_EVAL_BACKEND == "pycocotools" and cocoeval_class(cfg) is COCOeval
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:  # not installed: "auto" is the fallback checked below
        COCOeval_faster = COCOeval
    assert (
        make_cfg().TEST.COCO_EVAL_BACKEND == "auto"
        and cocoeval_class(make_cfg()) is COCOeval_faster
    )

    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    assert cocoeval_class(make_cfg()) is COCOeval  # "auto" falls back
    cfg = make_cfg(opts=["TEST.COCO_EVAL_BACKEND", "faster_coco_eval"])
    message = "TEST.COCO_EVAL_BACKEND='faster_coco_eval'.*pip install faster-coco-eval"
    with pytest.raises(ImportError, match=message):
        cocoeval_class(cfg)
    cfg.TEST.COCO_EVAL_BACKEND = "fast"
    message = "TEST.COCO_EVAL_BACKEND='fast' .*'auto', 'faster_coco_eval', 'pycocotools'"
    with pytest.raises(ValueError, match=message):
        cocoeval_class(cfg)


def test_detectron2_without_the_cocoeval_argument_falls_back(monkeypatch):
    """Detectron2 v0.6's ``_evaluate_predictions_on_coco`` takes no ``cocoeval_fn`` (it picks
    pycocotools or its own fast class from ``use_fast_impl``): "auto" then evaluates with
    pycocotools instead of failing at the end of a training run; an explicit request fails early."""
    from detr_d2 import evaluation

    monkeypatch.setattr(evaluation, "detectron2_takes_cocoeval_fn", lambda: False)
    assert cocoeval_class(make_cfg()) is coco_evaluation.COCOeval
    with pytest.raises(
        RuntimeError, match="TEST.COCO_EVAL_BACKEND='faster_coco_eval' cannot be applied"
    ):
        cocoeval_class(make_cfg(opts=["TEST.COCO_EVAL_BACKEND", "faster_coco_eval"]))
