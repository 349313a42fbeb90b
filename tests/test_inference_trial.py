"""The inference trial: what a new user throws at the tools after training.

1. A folder of real-world files (empty, text, truncated, odd but valid modes, EXIF rotation, tiny
   and too elongated images) through tools/predict.py and tools/visualize_attention.py: readable
   images are predicted, the others skipped with one line each and counted, exit status 1.
2. Checkpoints that do not fit the config (another dilation, depth, layer count or width;
   backbone-only weights; our own checkpoint of another architecture), made from the reference
   fixtures' official layouts, through every loading path: an error naming what differs and the
   config that fits, or a load where the difference is documented (queries, ``INIT.PARTIAL``).
3. User errors in the tools (unsafe file, missing path, unknown key) end with one line, exit 2.
"""

import argparse
import fractions
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detr_d2.checkpoint import DetrCheckpointer
from detr_d2.checkpoint_fit import CheckpointMismatch

from helpers import (
    CONFIGS,
    LOADING_PATHS,
    REPO,
    build_model_no_weights,
    cfg_for_manifest,
    load_reference,
    load_through,
    make_cfg,
)

SAMPLE = CONFIGS / "detr_face_sample.yaml"


def run_tool(name, *args):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return result.returncode, result.stdout + result.stderr


# ------------------------------------------------------------------------------ image folders
def make_folder(root):
    """(folder, readable: name -> (height, width) as the model sees it, unreadable names)."""
    rng = np.random.default_rng(0)
    folder = root / "photos"
    folder.mkdir()
    rgb = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "a_plain.png")
    Image.fromarray(rgb).convert("L").save(folder / "b_gray.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "c_rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "d_palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "e_cmyk.jpg")
    Image.fromarray((rng.random((48, 64)) * 65535).astype(np.uint16)).save(folder / "f_16bit.png")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees on display
    rotated.save(folder / "g_exif.jpg", exif=exif)
    Image.fromarray(rgb[:1, :1]).save(folder / "h_one_pixel.png")
    Image.fromarray(rgb[:2, :]).resize((600, 2)).save(folder / "i_elongated_ok.png")
    Image.fromarray(np.zeros((1, 3000, 3), np.uint8)).save(folder / "z_too_long.png")
    (folder / "x_empty.jpg").write_bytes(b"")
    (folder / "x_text.png").write_text("not an image\n")
    data = (folder / "a_plain.png").read_bytes()
    (folder / "x_truncated.png").write_bytes(data[: len(data) // 2])
    readable = {
        "a_plain.png": (48, 64),
        "b_gray.png": (48, 64),
        "c_rgba.png": (48, 64),
        "d_palette.png": (48, 64),
        "e_cmyk.jpg": (48, 64),
        "f_16bit.png": (48, 64),
        "g_exif.jpg": (64, 48),
        "h_one_pixel.png": (1, 1),
        "i_elongated_ok.png": (2, 600),
    }
    unreadable = ["x_empty.jpg", "x_text.png", "x_truncated.png", "z_too_long.png"]
    return folder, readable, unreadable


def test_predict_folder_trial(tmp_path):
    folder, readable, unreadable = make_folder(tmp_path)
    out = tmp_path / "out"
    code, log = run_tool(
        "predict", "--config-file", SAMPLE, "--input", folder, "--output", out,
        "MODEL.WEIGHTS", "", "DATASETS.TEST", "()",
    )  # fmt: skip
    assert code == 1, log
    assert "Traceback" not in log, log
    records = {
        r["file_name"].rsplit("/", 1)[-1]: r
        for r in json.loads((out / "predictions.json").read_text())
    }
    assert {n: (r["height"], r["width"]) for n, r in records.items()} == readable
    for name in readable:
        assert (out / records[name]["drawing"]).is_file()
    skipped = {
        s["file_name"].rsplit("/", 1)[-1]: s["reason"]
        for s in json.loads((out / "skipped.json").read_text())
    }
    assert sorted(skipped) == unreadable
    assert skipped["x_empty.jpg"] == "empty file"
    assert (
        "too elongated" in skipped["z_too_long.png"]
        and "INPUT.MAX_SIZE_TEST" in skipped["z_too_long.png"]
    )
    for name in unreadable:  # one line each, naming the file
        assert sum(f"Skipped {folder / name}:" in line for line in log.splitlines()) == 1, log
    assert f"Skipped {len(unreadable)} of {len(readable) + len(unreadable)} files" in log


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from detr_d2.predictor import DetrPredictor

    values = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")
    predictor = DetrPredictor(make_cfg(SAMPLE, ["DATASETS.TEST", "()"]), load_weights=False)
    image = predictor.read_image(str(tmp_path / "depth.png"))
    np.testing.assert_allclose(image[..., 0].astype(float), values / 257, atol=0.51)


def test_visualize_attention_folder_trial(tmp_path):
    folder, readable, unreadable = make_folder(tmp_path)
    for name in list(readable)[1:]:  # keep the run short: one readable image, the bad ones
        (folder / name).unlink()
    out = tmp_path / "att"
    code, log = run_tool(
        "visualize_attention", "--config-file", SAMPLE, "--random-weights", "--input", folder,
        "--output", out, "DATASETS.TEST", "()",
    )  # fmt: skip
    assert code == 1, log
    assert "Traceback" not in log, log
    assert any(p.name.startswith("a-plain") for p in out.iterdir())
    for name in unreadable:
        assert f"Skipped {folder / name}:" in log, log
    assert f"Skipped {len(unreadable)} of {len(unreadable) + 1} files" in log


def test_export_skips_an_unreadable_sample_image(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    out = tmp_path / "export"
    code, log = run_tool(
        "export_model", "--config-file", SAMPLE, "--format", "torchscript", "--output", out,
        "--sample-image", tmp_path / "bad.png", "MODEL.WEIGHTS", "", "DATASETS.TEST", "()",
    )  # fmt: skip
    assert code == 1, log
    assert "Traceback" not in log and f"Skipped {tmp_path / 'bad.png'}:" in log, log
    assert any(out.iterdir())


# ------------------------------------------------------------------------- mismatched checkpoints
@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """Official-format files with their training ``args``, as the official code saves them."""
    import importlib.util

    from helpers import _fixture

    spec = importlib.util.spec_from_file_location("mk", _fixture("make_upstream_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path_factory.mktemp("official")
    files = {}
    for variant in ("r50", "r50_dc5"):
        _, manifest = load_reference(variant)
        state = module.make_state_dict(manifest, 0)
        args = argparse.Namespace(**manifest["model"], lr=1e-4)
        files[variant] = root / f"{variant}.pth"
        torch.save({"model": state, "args": args}, files[variant])
        if variant == "r50":
            files["r50_no_args"] = root / "r50_no_args.pth"
            torch.save({"model": state}, files["r50_no_args"])
            # an R101 layout: res4 (torchvision layer3) with 23 blocks
            deep = dict(state)
            for block in range(6, 23):
                for key, value in state.items():
                    if key.startswith("backbone.0.body.layer3.5."):
                        deep[key.replace("layer3.5.", f"layer3.{block}.")] = value.clone()
            files["r101"] = root / "r101.pth"
            torch.save(
                {
                    "model": deep,
                    "args": argparse.Namespace(**{**manifest["model"], "backbone": "resnet101"}),
                },
                files["r101"],
            )
            files["r101_no_args"] = root / "r101_no_args.pth"
            torch.save({"model": deep}, files["r101_no_args"])
            files["backbone_only"] = root / "backbone_only.pth"
            torch.save(
                {"model": {k: v for k, v in state.items() if k.startswith("backbone.0.body.")}},
                files["backbone_only"],
            )
    return files


def r50_cfg(weights, *opts):
    _, manifest = load_reference("r50")
    cfg = cfg_for_manifest(manifest["model"])
    cfg.merge_from_list(["MODEL.WEIGHTS", str(weights), *opts])
    return cfg


@pytest.mark.parametrize("path", LOADING_PATHS[:3])
def test_dc5_file_in_the_r50_config_names_the_dilation_and_the_config(official_files, path):
    with pytest.raises(CheckpointMismatch) as error:
        load_through(path, r50_cfg(official_files["r50_dc5"]))
    message = str(error.value)
    assert (
        "res5_dilation 2 in the checkpoint, 1 in the config (MODEL.RESNETS.RES5_DILATION)"
        in message
    )
    assert "configs/detr_r50_dc5.yaml" in message


def test_r101_file_in_the_r50_config(official_files):
    with pytest.raises(
        CheckpointMismatch,
        match=r"depth 101 in the checkpoint, 50 in the config .*configs/detr_r101\.yaml",
    ):
        load_through("build_checkpointer", r50_cfg(official_files["r101"]))
    # without args, the key layout gives it away: the res4 blocks the R50 has no place for
    with pytest.raises(
        CheckpointMismatch,
        match=r"checkpoint tensors the model has no place for: backbone\.res4\.6",
    ):
        load_through("DetectionCheckpointer", r50_cfg(official_files["r101_no_args"]))


def test_layer_count_and_width_mismatches(official_files):
    with pytest.raises(
        CheckpointMismatch,
        match=r"dec_layers 6 in the checkpoint, 3 in the config \(MODEL\.DETR\.DEC_LAYERS\)",
    ):
        load_through(
            "build_checkpointer", r50_cfg(official_files["r50"], "MODEL.DETR.DEC_LAYERS", "3")
        )
    with pytest.raises(CheckpointMismatch, match=r"no place for: transformer\.decoder\.layers"):
        load_through(
            "build_checkpointer",
            r50_cfg(official_files["r50_no_args"], "MODEL.DETR.DEC_LAYERS", "3"),
        )
    with pytest.raises(CheckpointMismatch, match=r"tensors of another shape"):
        load_through(
            "build_checkpointer",
            r50_cfg(official_files["r50_no_args"], "MODEL.DETR.DIM_FEEDFORWARD", "1024"),
        )


def test_documented_differences_load(official_files):
    """Fewer queries and another class count are fine-tuning, not mismatches."""
    model = load_through(
        "build_checkpointer",
        r50_cfg(
            official_files["r50"],
            "MODEL.DETR.NUM_OBJECT_QUERIES",
            "50",
            "MODEL.DETR.NUM_CLASSES",
            "1",
        ),
    )
    assert model.query_embed.weight.shape[0] == 50


def test_backbone_only_weights_need_the_partial_key(official_files, caplog):
    with pytest.raises(
        CheckpointMismatch,
        match=r"not in the checkpoint: transformer\..*MODEL\.DETR\.INIT\.PARTIAL True",
    ):
        load_through("build_checkpointer", r50_cfg(official_files["backbone_only"]))
    with caplog.at_level(logging.WARNING, logger="detr_d2"):
        model = load_through(
            "build_checkpointer",
            r50_cfg(official_files["backbone_only"], "MODEL.DETR.INIT.PARTIAL", "True"),
        )
    assert "Partial load" in caplog.text
    state = torch.load(official_files["backbone_only"], weights_only=True)["model"]
    torch.testing.assert_close(
        model.backbone.stem.conv1.weight, state["backbone.0.body.conv1.weight"]
    )


def test_own_checkpoint_of_another_architecture(tmp_path):
    cfg = make_cfg(
        SAMPLE, ["MODEL.DETR.DEC_LAYERS", "2", "DATASETS.TEST", "()", "DATASETS.TRAIN", "()"]
    )
    model = build_model_no_weights(cfg)
    DetrCheckpointer(model, save_dir=str(tmp_path)).save("model")
    other = make_cfg(
        SAMPLE, ["MODEL.DETR.DEC_LAYERS", "3", "MODEL.WEIGHTS", str(tmp_path / "model.pth")]
    )
    with pytest.raises(
        CheckpointMismatch, match=r"dec_layers 2 in the checkpoint, 3 in the config"
    ):
        load_through("build_checkpointer", other)
    same = make_cfg(
        SAMPLE, ["MODEL.DETR.DEC_LAYERS", "2", "MODEL.WEIGHTS", str(tmp_path / "model.pth")]
    )
    loaded = load_through("DetectionCheckpointer", same)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


# ---------------------------------------------------------------------------- one-line errors
def one_line_error(code, log):
    assert code == 2, log
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if ": error: " in line]
    assert len(errors) == 1, log
    return errors[0]


def test_tools_end_user_errors_in_one_line(tmp_path, official_files):
    common = [
        "--input",
        REPO / "tests" / "fixtures" / "detr_reference" / "images",
        "--output",
        tmp_path / "o",
    ]
    line = one_line_error(
        *run_tool(
            "predict",
            "--config-file",
            CONFIGS / "detr_r50.yaml",
            *common,
            "MODEL.WEIGHTS",
            official_files["r50_dc5"],
            "MODEL.DEVICE",
            "cpu",
        )
    )
    assert "configs/detr_r50_dc5.yaml" in line and str(official_files["r50_dc5"]) in line
    line = one_line_error(
        *run_tool(
            "predict", "--config-file", SAMPLE, *common, "MODEL.WEIGHTS", tmp_path / "missing.pth"
        )
    )
    assert "no such file" in line
    line = one_line_error(
        *run_tool("predict", "--config-file", SAMPLE, *common, "MODEL.DETR.NO_SUCH_KEY", "1")
    )
    assert "MODEL.DETR.NO_SUCH_KEY" in line
    line = one_line_error(*run_tool("predict", "--config-file", tmp_path / "nope.yaml", *common))
    assert "nope.yaml" in line
    torch.save({"model": {}, "x": fractions.Fraction(1, 3)}, tmp_path / "unsafe.pth")
    line = one_line_error(
        *run_tool(
            "predict", "--config-file", SAMPLE, *common, "MODEL.WEIGHTS", tmp_path / "unsafe.pth"
        )
    )
    assert (
        "Refusing to load" in line and "fractions.Fraction" in line and "weights_only" not in line
    )


def test_imagenet_resnet_from_torchvision_is_a_partial_start(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet50(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(CheckpointMismatch, match=r"not in the checkpoint: transformer"):
        load_through("build_checkpointer", r50_cfg(tmp_path / "resnet50.pth"))
    model = load_through(
        "DetectionCheckpointer",
        r50_cfg(tmp_path / "resnet50.pth", "MODEL.DETR.INIT.PARTIAL", "True"),
    )
    torch.testing.assert_close(model.backbone.res4[5].conv2.weight, resnet.layer3[5].conv2.weight)
    torch.testing.assert_close(model.backbone.stem.conv1.norm.running_var, resnet.bn1.running_var)
