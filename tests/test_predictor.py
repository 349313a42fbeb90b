"""DetrPredictor and tools/predict.py: the real class names in drawings and JSON, from the
config's datasets or from a model directory alone."""

import json
import logging
from pathlib import Path

import pytest
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from detr_d2.engine import build_checkpointer
from detr_d2.predictor import DetrPredictor, list_images

from helpers import (
    CONFIGS,
    build_model_no_weights,
    load_tool,
    make_cfg,
    sample_face_opts,
    write_cfg,
)


@pytest.fixture(scope="module")
def face_model(tmp_path_factory):
    """A (random) sample face model saved by the checkpointer, its config and the images."""
    root = tmp_path_factory.mktemp("faces")
    opts = sample_face_opts(root, "predictor_faces", num_train=2, num_val=2, seed=0)
    cfg = make_cfg(CONFIGS / "quick_schedules" / "detr_face_sample_instant_test.yaml", opts)
    cfg.OUTPUT_DIR = str(root / "model")
    from detr_d2.data import register_datasets_from_cfg

    register_datasets_from_cfg(cfg)
    model = build_model_no_weights(cfg)
    assert model.class_layout.names == ("face",)
    (root / "model").mkdir()
    build_checkpointer(cfg, model).save("model_final")
    cfg.MODEL.WEIGHTS = str(root / "model" / "model_final.pth")
    return cfg, root


class _RecordingVisualizer(Visualizer):
    labels = []

    def overlay_instances(self, *args, labels=None, **kwargs):
        _RecordingVisualizer.labels += list(labels or [])
        return super().overlay_instances(*args, labels=labels, **kwargs)


@pytest.mark.parametrize("with_datasets", [True, False])
def test_predict_draws_and_writes_real_class_names(
    face_model, tmp_path, monkeypatch, with_datasets
):
    """With the config's datasets, and from the model directory alone (config without datasets +
    the checkpoint's saved layout): the face is labelled "face", never "class 0"."""
    cfg, root = face_model
    cfg = cfg.clone()
    if not with_datasets:
        cfg.DATASETS.REGISTER_COCO, cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = [], (), ()
    config = write_cfg(cfg, tmp_path / "config.yaml")
    predict = load_tool("predict")
    monkeypatch.setattr(predict, "Visualizer", _RecordingVisualizer)
    _RecordingVisualizer.labels = []
    out = tmp_path / "out"
    argv = ["--config-file", str(config), "--input", str(root / "val"), "--output", str(out)]
    assert predict.main(argv + ["--score-threshold", "0"]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    names = {i["category_name"] for p in predictions for i in p["instances"]}
    assert names == {"face"}
    assert _RecordingVisualizer.labels and all(
        label.startswith("face ") for label in _RecordingVisualizer.labels
    )


def test_predictor_names_and_folder_input(face_model):
    cfg, root = face_model
    predictor = DetrPredictor(cfg)
    assert predictor.class_names == ["face"] and predictor.metadata.thing_classes == ["face"]
    paths = list_images([str(root / "val")])
    assert len(paths) == 2
    instances = predictor(predictor.read_image(paths[0]))["instances"]
    assert len(instances) == cfg.MODEL.DETR.NUM_OBJECT_QUERIES
    with pytest.raises(FileNotFoundError, match="--input .*missing.png: no such file"):
        list_images([str(root / "missing.png")])


def test_predict_skips_unreadable_files_and_reads_odd_images(face_model, tmp_path, caplog):
    """A folder as real photo folders are: an empty file, a text file and a truncated image among
    ordinary and odd-but-valid images (grayscale, RGBA, palette, CMYK). The readable ones are
    predicted and written, each bad one is named with its reason, the exit status is 1."""
    cfg, root = face_model
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted((root / "val").glob("*.png"))
    image = Image.open(good[0]).convert("RGB")
    image.save(folder / "a_ordinary.png")
    image.convert("L").save(folder / "b_gray.png")
    image.convert("RGBA").save(folder / "c_rgba.png")
    image.convert("P").save(folder / "d_palette.png")
    image.convert("CMYK").save(folder / "e_cmyk.jpg")
    (folder / "f_empty.png").write_bytes(b"")
    (folder / "g_text.jpg").write_text("not an image\n")
    data = good[1].read_bytes()
    (folder / "h_truncated.png").write_bytes(data[: len(data) // 2])
    config = write_cfg(cfg, tmp_path / "config.yaml")
    out = tmp_path / "out"
    argv = ["--config-file", str(config), "--input", str(folder), "--output", str(out)]
    with caplog.at_level(logging.WARNING, logger="detr_d2"):
        assert load_tool("predict").main(argv) == 1
    predicted = [
        Path(p["file_name"]).name for p in json.loads((out / "predictions.json").read_text())
    ]
    assert predicted == [
        "a_ordinary.png",
        "b_gray.png",
        "c_rgba.png",
        "d_palette.png",
        "e_cmyk.jpg",
    ]
    assert all((out / f"{Path(name).stem}.png").exists() for name in predicted)
    skipped = {
        Path(s["file_name"]).name: s["reason"]
        for s in json.loads((out / "skipped.json").read_text())
    }
    assert skipped["f_empty.png"] == "empty file"
    assert skipped["g_text.jpg"] == "not an image PIL can read"
    assert (
        "truncated" in skipped["h_truncated.png"].lower() or "OSError" in skipped["h_truncated.png"]
    )
    assert caplog.text.count("Skipped ") == 4  # one line per file and the count at the end
    assert "Skipped 3 of 8 files" in caplog.text
