"""Attention capture (parity with the official weights on the reference fixtures, hooks that
change nothing and disappear) and tools/visualize_attention.py end to end."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detr_d2.attention import (
    CapturedAttention,
    attention_to_image,
    capture_attention,
    point_to_token,
    valid_feature_size,
)

from helpers import (
    REPO,
    assert_close,
    build_model_no_weights,
    load_tool,
    reference_model,
    tiny_cfg,
    write_cfg,
)

ATOL = 5e-5  # the fixtures' suggested tolerance for attention maps


def attention_modules(model):
    """The modules capture_attention hooks."""
    transformer = model.transformer
    return (
        [transformer]
        + [layer.self_attn for layer in transformer.encoder.layers]
        + [layer.multihead_attn for layer in transformer.decoder.layers]
    )


# ---------------------------------------------------------------- parity with the official model
@pytest.fixture(scope="module", params=["r50", "r50_dc5"])
def captured(request, tmp_path_factory):
    expected, model, inputs = reference_model(request.param, tmp_path_factory.mktemp("ckpt"))
    with capture_attention(model) as attention:
        raw = model.predict_raw(inputs)
    return {"expected": expected, "attention": attention, "raw": raw, "model": model}


def test_capture_matches_reference(captured):
    reference, attention = captured["expected"]["attention"], captured["attention"]
    n, _, h, w = reference["feature_shape"]
    assert attention.feature_size == (h, w)
    assert torch.equal(attention.padding_mask, reference["feature_mask"])
    assert len(attention.encoder_self_attn) == len(attention.decoder_cross_attn) == 6
    assert attention.encoder_self_attn[0].shape == (n, 8, h * w, h * w)
    assert attention.decoder_cross_attn[0].shape == (n, 8, 100, h * w)
    # the fixtures hold nn.MultiheadAttention's head average of the last layers
    assert_close(
        attention.encoder_self_attn[-1].mean(1), reference["enc_self_attn_last"], ATOL, "encoder"
    )
    assert_close(
        attention.decoder_cross_attn[-1].mean(1), reference["dec_cross_attn_last"], ATOL, "decoder"
    )
    assert_close(
        attention.decoder_map(0, 5), reference["dec_cross_attn_last"][0, 5].view(h, w), ATOL, "map"
    )


def test_capture_keeps_reference_outputs(captured):
    """Outputs computed with the capture on still match the official ones (parity tolerance)."""
    expected = captured["expected"]["outputs"]
    assert_close(captured["raw"]["pred_logits"], expected["pred_logits"], 1e-4, "pred_logits")
    assert_close(captured["raw"]["pred_boxes"], expected["pred_boxes"], 1e-4, "pred_boxes")


def test_padded_keys_get_no_attention(captured):
    attention = captured["attention"]
    padded = attention.padding_mask.flatten(1)  # [N, S]
    assert padded.any(), "the fixture batch pads the square image: keys at padding exist"
    for weights in attention.encoder_self_attn + attention.decoder_cross_attn:
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        assert weights.masked_select(padded[:, None, None, :]).abs().max() == 0


def test_hooks_removed_after_reference_capture(captured):
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks
        for m in attention_modules(captured["model"])
    )


# ---------------------------------------------------------------- behaviour on a tiny model
@pytest.fixture(scope="module")
def tiny():
    model = build_model_no_weights(tiny_cfg()).eval()
    torch.manual_seed(1)
    inputs = [
        {"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)},
        {"image": torch.randint(0, 255, (3, 70, 64), dtype=torch.uint8)},  # padded in the batch
    ]
    return model, inputs


def test_outputs_unchanged_by_capture(tiny):
    """The model outside the block runs exactly as built; inside, MultiheadAttention computes the
    same attention by its explicit-softmax path instead of the fused kernel (float rounding)."""
    model, inputs = tiny
    before = model.predict_raw(inputs)
    with capture_attention(model) as attention:
        during = model.predict_raw(inputs)
    after = model.predict_raw(inputs)
    assert attention.decoder_cross_attn, "nothing captured"
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(before[key], after[key]), key
        assert torch.allclose(before[key], during[key], rtol=0, atol=1e-5), key


def test_hooks_removed_even_on_error(tiny):
    model, inputs = tiny
    with pytest.raises(KeyError):
        with capture_attention(model):
            assert all(m._forward_pre_hooks for m in attention_modules(model))
            raise KeyError("inside the block")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in attention_modules(model))


def test_maps_heads_layers_and_errors(tiny):
    model, inputs = tiny
    with capture_attention(model) as attention:
        model.predict_raw(inputs)
        model.predict_raw(inputs[:1])  # each forward replaces the previous record
    h, w = attention.feature_size
    assert attention.padding_mask.shape == (1, h, w)
    assert len(attention.encoder_self_attn) == 2 and attention.num_heads == 4
    decoder = attention.decoder_cross_attn[-1]  # [N, M, Q, S]
    assert decoder.shape == (1, 4, 7, h * w)
    assert torch.allclose(attention.decoder_map(0, 3), decoder[0, :, 3].mean(0).view(h, w))
    assert torch.equal(
        attention.decoder_map(0, 3, layer=0, head=2),
        attention.decoder_cross_attn[0][0, 2, 3].view(h, w),
    )
    assert torch.equal(
        attention.encoder_map(0, 5, head=1), attention.encoder_self_attn[-1][0, 1, 5].view(h, w)
    )
    with pytest.raises(IndexError, match="layer 2 out of range"):
        attention.decoder_map(0, 0, layer=2)
    with pytest.raises(IndexError, match="head 4 out of range"):
        attention.encoder_map(0, 0, head=4)
    with pytest.raises(RuntimeError, match="No attention was captured"):
        CapturedAttention().decoder_map(0, 0)


# ---------------------------------------------------------------- feature map <-> pixels
def test_attention_to_image_crops_padding_and_aligns():
    # a 64x96 padded batch, 2x3 feature map (stride 32); the image is 40x60: rows 0-1 and
    # columns 0-1 hold image pixels (nearest sampling of the pixel mask), column 2 is padding
    mask = torch.tensor([[False, False, True], [False, False, True]])
    assert valid_feature_size(mask) == (2, 2)
    one_hot = torch.zeros(2, 3)
    one_hot[0, 1] = 1.0
    heat = attention_to_image(one_hot, mask, (40, 60), (64, 96))
    assert heat.shape == (40, 60)
    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
    assert 0 <= y < 32 and 32 <= x < 60, "the peak lies in the pixels of token (0, 1)"
    padded_only = torch.zeros(2, 3)
    padded_only[:, 2] = 1.0
    assert attention_to_image(padded_only, mask, (40, 60), (64, 96)).abs().max() == 0
    resized = attention_to_image(one_hot, mask, (40, 60), (64, 96), output_size=(80, 120))
    assert resized.shape == (80, 120)
    assert np.unravel_index(int(resized.argmax()), resized.shape)[1] >= 64


def test_point_to_token():
    mask = torch.tensor([[False, False, True], [False, False, True]])
    assert point_to_token((50, 10), mask, (40, 60), (64, 96)) == (1, 0, 1)
    assert point_to_token((59, 39), mask, (40, 60), (64, 96)) == (4, 1, 1)
    # in pixels of a 2x larger original image
    assert point_to_token((100, 70), mask, (40, 60), (64, 96), point_image_size=(80, 120)) == (
        4,
        1,
        1,
    )


# ---------------------------------------------------------------- the command-line tool
@pytest.fixture(scope="module")
def tool_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize")
    cfg = tiny_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 160
    config = write_cfg(cfg, root / "tiny.yaml")
    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (150, 230, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (200, 120, 3), dtype=np.uint8)).save(
        folder / "tall image.jpg"
    )
    return root, config, folder


def png_size(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.format, image.size


def test_visualize_tool_end_to_end(tool_setup):
    """The command line a user types, on a folder: fallback to the top-3 queries (a random model
    detects nothing at 0.7), automatic 2x2 grid of encoder points, one summary per image."""
    root, config, folder = tool_setup
    out = root / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/visualize_attention.py"),
            "--config-file",
            str(config),
            "--random-weights",
            "--input",
            str(folder),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    assert "no detection above score threshold 0.7" in log and "top-3" in log
    names = sorted(p.name for p in out.iterdir())
    for stem in ("wide", "tall-image"):
        decoder = [
            n
            for n in names
            if re.fullmatch(rf"{stem}_top0[0-2]_class-[0-2]_0\.\d\d_dec-layer1-avg\.png", n)
        ]
        encoder = [n for n in names if re.fullmatch(rf"{stem}_enc_x\d+_y\d+_layer1\.png", n)]
        assert len(decoder) == 3 and len(encoder) == 4, names
        assert f"{stem}_summary.png" in names
    assert len(names) == 2 * 8
    for name in names:
        kind, (width, height) = png_size(out / name)
        assert kind == "PNG" and width >= 400 and height >= 250, (name, width, height)
    assert "wide_enc_x58_y38_layer1.png" in names  # 2x2 grid at 1/4 and 3/4 of 230x150


def test_visualize_tool_options(tool_setup):
    """Detections above the threshold, points in pixels, a chosen layer and head."""
    root, config, folder = tool_setup
    tool = load_tool("visualize_attention")
    out = root / "options"
    argv = [
        "--config-file",
        str(config),
        "--random-weights",
        "--input",
        str(folder / "wide.png"),
        "--output",
        str(out),
        "--score-threshold",
        "0",
        "--max-detections",
        "2",
        "--layer",
        "0",
        "--head",
        "3",
        "--points",
        "10,20",
        "229,149",
        "--opts",  # config overrides after an option of several values
        "INPUT.MAX_SIZE_TEST",
        "170",
    ]
    assert tool.main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if "_dec-" in n] == [
        n
        for n in names
        if re.fullmatch(r"wide_det0[01]_class-[0-2]_0\.\d\d_dec-layer0-head3\.png", n)
    ]
    assert len([n for n in names if "_dec-" in n]) == 2
    assert (
        "wide_enc_x10_y20_layer0-head3.png" in names
        and "wide_enc_x229_y149_layer0-head3.png" in names
    )
    assert "wide_summary.png" in names and len(names) == 5


def test_visualize_tool_argument_errors(tool_setup, capsys):
    root, config, folder = tool_setup
    tool = load_tool("visualize_attention")
    common = [
        "--config-file",
        str(config),
        "--input",
        str(folder),
        "--output",
        str(root / "errors"),
    ]
    with pytest.raises(SystemExit):
        tool.main(common)  # neither --weights nor --random-weights
    assert "--weights FILE is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(common + ["--random-weights", "--layer", "5"])
    assert "--layer" in capsys.readouterr().err
