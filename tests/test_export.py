"""TorchScript and ONNX (onnxruntime) exports against the PyTorch model.

On the reference fixtures' official layouts (R50, R50-DC5, R50 panoptic), each exported once per
format (module-scoped), in fp32: raw logits and boxes within 1e-4, mask logits within 1e-3 and
identical classes, checked on the traced batch, on the fixture batch (two differently sized
images, another padded size) and on one image of a third size, so a size frozen into the graph
fails. Small models cover bf16, Detectron2's TracingAdapter and the command-line tools.
"""

import json
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

from detr_d2.engine import build_checkpointer
from detr_d2.export import ExportedDetr, example_images, export_model, pad_batch

from helpers import (
    CONFIGS,
    build_model_no_weights,
    cfg_for_manifest,
    load_reference,
    load_tool,
    make_upstream_checkpoint,
    reference_inputs,
    sample_face_opts,
    tiny_cfg,
    write_cfg,
)

logger = logging.getLogger(__name__)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BACKENDS = {"torchscript": "torchscript", "onnx": "onnxruntime"}
# DC5 differs from R50 only by the dilation of res5 (constants of the trace): its TorchScript
# export is left to R50, to keep the suite's heaviest exports at five.
FORMATS = {
    "r50": ("torchscript", "onnx"),
    "r50_dc5": ("onnx",),
    "r50_panoptic": ("torchscript", "onnx"),
}


def assert_close(actual, expected, atol, name):
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    diff = (actual.float() - expected.float()).abs().max().item()
    logger.info(f"{name}: max abs difference {diff:.3g}")
    assert diff <= atol, f"{name}: max abs difference {diff:.3g} > {atol}"
    return diff


def size_cases(images):
    """Named lists of CHW images: the traced batch, the fixture batch and a third size."""
    third = F.interpolate(images[1][None].float(), size=(256, 352), mode="bilinear")[0].round()
    return {
        "export size": example_images(images[0]),
        "fixture batch": images,
        "other size": [third],
    }


def skip_unexported(reference, fmt):
    if fmt not in reference["exports"]:
        pytest.skip(f"{reference['variant']} is not exported to {fmt} (see FORMATS)")


@pytest.fixture(scope="module", params=list(FORMATS))
def reference(request, tmp_path_factory):
    """PyTorch model, its raw outputs on every size case, and its two exports."""
    variant = request.param
    directory = tmp_path_factory.mktemp(f"export_{variant}")
    expected, manifest = load_reference(variant)
    cfg = cfg_for_manifest(manifest["model"], masks=True)
    cfg.MODEL.WEIGHTS = str(
        make_upstream_checkpoint(manifest, expected["args"]["seed"], directory / "upstream.pth")
    )
    if cfg.MODEL.MASK_ON:
        cfg.MODEL.DETR.TEST.PANOPTIC_THRESHOLD = expected["panoptic"]["threshold"]
    model = build_model_no_weights(cfg)
    build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model.eval()
    images = [x["image"] for x in reference_inputs(expected)]
    cases = size_cases(images)
    raw = {
        name: model.predict_raw([{"image": image} for image in case])
        for name, case in cases.items()
    }
    exports = {
        fmt: ExportedDetr(
            str(export_model(model, cfg, fmt, str(directory / fmt), images[0]).parent),
            BACKENDS[fmt],
        )
        for fmt in FORMATS[variant]
    }
    return {
        "variant": variant,
        "expected": expected,
        "model": model,
        "cases": cases,
        "raw": raw,
        "exports": exports,
    }


@pytest.mark.parametrize("fmt", list(BACKENDS))
def test_exported_matches_pytorch_at_every_size(reference, fmt):
    skip_unexported(reference, fmt)
    for name, case in reference["cases"].items():
        outputs = reference["exports"][fmt].run_graph(*pad_batch(case))
        ours = reference["raw"][name]
        label = f"{reference['variant']} {fmt} {name}"
        assert_close(outputs["pred_logits"], ours["pred_logits"], 1e-4, f"{label} pred_logits")
        assert_close(outputs["pred_boxes"], ours["pred_boxes"], 1e-4, f"{label} pred_boxes")
        if "pred_masks" in ours:
            assert_close(outputs["pred_masks"], ours["pred_masks"], 1e-3, f"{label} pred_masks")
        scores, classes = F.softmax(ours["pred_logits"], -1)[..., :-1].max(-1)
        assert torch.equal(outputs["classes"], classes), f"{label}: post-processed classes differ"
        assert_close(outputs["scores"], scores, 1e-5, f"{label} scores")


@pytest.mark.parametrize("fmt", list(BACKENDS))
def test_exported_matches_official_outputs(reference, fmt):
    """The fixture batch through the export equals the official DETR outputs."""
    skip_unexported(reference, fmt)
    outputs = reference["exports"][fmt].run_graph(*pad_batch(reference["cases"]["fixture batch"]))
    official = reference["expected"]["outputs"]
    assert_close(outputs["pred_logits"], official["pred_logits"], 1e-4, "pred_logits vs official")
    assert_close(outputs["pred_boxes"], official["pred_boxes"], 1e-4, "pred_boxes vs official")


@pytest.mark.parametrize("fmt", list(BACKENDS))
def test_exported_postprocessing_equals_pytorch(reference, fmt):
    """Detectron2 outputs (instances, and panoptic from the exported mask logits) are those of
    the PyTorch model, at a requested output size."""
    skip_unexported(reference, fmt)
    model, exported = reference["model"], reference["exports"][fmt]
    inputs = [
        {"image": image, "height": image.shape[1] * 3 // 2, "width": image.shape[2] * 3 // 2}
        for image in reference["cases"]["fixture batch"]
    ]
    with torch.no_grad():
        ours = model(inputs)
    theirs = exported(inputs)
    for mine, other in zip(ours, theirs):
        assert set(mine) == set(other)
        if "instances" in mine:
            a, b = mine["instances"], other["instances"]
            assert a.image_size == b.image_size and torch.equal(a.pred_classes, b.pred_classes)
            assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, 1e-2, "boxes (pixels)")
        if "panoptic_seg" in mine:
            # Mask logits differ by ~1e-4 (of values in the hundreds): the same segments, and
            # the pixel assignment of near-ties may flip, within the bar of the PyTorch-vs-
            # official panoptic parity test (99.9 % of the pixels, areas to 0.1 % of the image).
            (ids, info), (other_ids, other_info) = mine["panoptic_seg"], other["panoptic_seg"]
            agree = (ids == other_ids).float().mean().item()
            logger.info(f"{fmt} panoptic ids: {agree:.6%} of the pixels equal")
            assert agree >= 0.999, f"panoptic ids agree on only {agree:.4%} of the pixels"
            assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [
                (s["id"], s["category_id"], s["isthing"]) for s in other_info
            ]
            tolerance = 1e-3 * ids.numel()  # the flipped pixels move between segments
            assert all(abs(a["area"] - b["area"]) <= tolerance for a, b in zip(info, other_info))
            assert [s["score"] for s in other_info] == pytest.approx(
                [s["score"] for s in info], abs=1e-5
            )
    if reference["variant"] == "r50_panoptic":
        assert any(len(out["panoptic_seg"][1]) for out in ours), "no panoptic segment to compare"


# ------------------------------------------------------------------ small models
@pytest.fixture(scope="module")
def tiny():
    model = build_model_no_weights(tiny_cfg()).eval()
    return model, torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)


def test_bf16_torchscript_runs_in_bf16(tiny, tmp_path):
    model, image = tiny
    exported = ExportedDetr(
        str(export_model(model, tiny_cfg(), "torchscript", str(tmp_path), image, "bf16").parent),
        "torchscript",
    )
    other = [torch.randint(0, 256, (3, 150, 70), dtype=torch.uint8), image]
    outputs = exported.run_graph(*pad_batch(other))
    model.test_precision = torch.bfloat16
    try:
        reference = model.predict_raw([{"image": x} for x in other])
    finally:
        model.test_precision = torch.float32
    fp32 = model.predict_raw([{"image": x} for x in other])
    assert_close(outputs["pred_logits"], reference["pred_logits"], 1e-2, "bf16 pred_logits")
    assert (outputs["pred_logits"] - fp32["pred_logits"]).abs().max() > 0, (
        "graph did not run in bf16"
    )
    meta = json.loads((tmp_path / "detr_export.json").read_text())
    assert meta["precision"] == "bf16" and meta["input_format"] == "RGB"


def test_onnx_refuses_reduced_precision(tiny, tmp_path):
    model, image = tiny
    with pytest.raises(ValueError, match="--precision bf16 is not available for ONNX"):
        export_model(model, tiny_cfg(), "onnx", str(tmp_path), image, "bf16")


def test_tracing_adapter_works_at_other_sizes(tiny):
    """Detectron2's own export route: TracingAdapter around inference(do_postprocess=False)."""
    from detectron2.export import TracingAdapter

    model, image = tiny
    adapter = TracingAdapter(
        model,
        [{"image": image.float()}],
        inference_func=lambda m, x: m.inference(x, do_postprocess=False),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    other = torch.randint(0, 256, (3, 120, 90)).float()
    traced_instances = adapter.outputs_schema(traced(other))[0]
    eager = model.inference([{"image": other}], do_postprocess=False)[0]
    assert tuple(int(v) for v in traced_instances.image_size) == eager.image_size == (120, 90)
    assert_close(traced_instances.pred_boxes.tensor, eager.pred_boxes.tensor, 1e-4, "traced boxes")
    assert torch.equal(traced_instances.pred_classes, eager.pred_classes)


@pytest.fixture(scope="module")
def face_setup(tmp_path_factory):
    """The sample-face config (BN folded, channels-last) with saved random weights and data."""
    root = tmp_path_factory.mktemp("export_faces")
    opts = sample_face_opts(root / "data", "export_faces", num_train=2, num_val=3, seed=5)
    torch.manual_seed(0)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from detr_d2 import add_detr_config

    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(str(CONFIGS / "detr_face_sample.yaml"))
    weights = root / "weights.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    opts += ["MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(root / "out")]
    return root, opts


def test_tools_export_eval_predict_and_benchmark(face_setup):
    root, opts = face_setup
    config = str(CONFIGS / "detr_face_sample.yaml")
    export_dir = root / "onnx"
    load_tool("export_model").main(
        [
            "--config-file",
            config,
            "--format",
            "onnx",
            "--output",
            str(export_dir),
            "--run-eval",
            *opts,
        ]
    )
    meta = json.loads((export_dir / "detr_export.json").read_text())
    assert meta["class_names"] == ["face"] and meta["output_names"][:2] == [
        "pred_logits",
        "pred_boxes",
    ]
    assert meta["pixel_mean"] and meta["min_size_test"] == 192
    results = json.loads((export_dir / "eval_results.json").read_text())
    assert "AP50" in results["bbox"]

    predict = load_tool("predict")
    images = str(root / "data" / "val")
    outputs = {}
    for backend in ("pytorch", "onnxruntime"):
        out = root / f"predict_{backend}"
        predict.main(
            [
                "--config-file",
                config,
                "--input",
                images,
                "--output",
                str(out),
                "--score-threshold",
                "0",
                "--backend",
                backend,
                "--exported",
                str(export_dir),
                *opts,
            ]
        )
        outputs[backend] = json.loads((out / "predictions.json").read_text())
        assert all((out / record["drawing"]).exists() for record in outputs[backend])
    for ours, theirs in zip(outputs["pytorch"], outputs["onnxruntime"], strict=True):
        assert [i["category_id"] for i in ours["instances"]] == [
            i["category_id"] for i in theirs["instances"]
        ]
        for a, b in zip(ours["instances"], theirs["instances"]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            assert a["bbox_xyxy"] == pytest.approx(b["bbox_xyxy"], abs=0.05)

    record = load_tool("benchmark").main(
        [
            "--config-file",
            config,
            "--task",
            "inference",
            "--backend",
            "onnxruntime",
            "--exported",
            str(export_dir),
            "--warmup",
            "0",
            "--iters",
            "1",
            "--output",
            str(root / "bench.json"),
            *opts,
        ]
    )
    assert record["backend"] == "onnxruntime" and record["images_per_second"] > 0


def test_tools_refuse_a_mismatched_export(face_setup, tiny, tmp_path):
    model, image = tiny
    export_model(model, tiny_cfg(), "torchscript", str(tmp_path), image)
    from detr_d2.export import exported_model

    with pytest.raises(ValueError, match="needs a model exported with --format onnx"):
        ExportedDetr(str(tmp_path), "onnxruntime")
    cfg = tiny_cfg()
    cfg.INPUT.FORMAT = "BGR"
    with pytest.raises(ValueError, match="INPUT.FORMAT='BGR'"):
        exported_model(cfg, "torchscript", str(tmp_path))
    cfg_file = write_cfg(tiny_cfg(), tmp_path / "tiny.yaml")
    with pytest.raises(FileNotFoundError, match="detr_export.json not found"):
        load_tool("predict").main(
            [
                "--config-file",
                str(cfg_file),
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path / "p"),
                "--backend",
                "torchscript",
                "--exported",
                str(tmp_path / "missing"),
            ]
        )
