"""tools/benchmark_peer.py (detr_tools.peer_benchmark): our weights under Hugging Face DETR's
names, the one-line error without transformers, and (with transformers in $DETR_PEER_PATH) the
same outputs from both models."""

import os
import sys

import pytest
import torch
from detr_tools import cli
from detr_tools.benchmark import synthetic_batch
from detr_tools.peer_benchmark import (
    PEER_PATH_ENV,
    copy_weights,
    hf_detr_config,
    hf_inputs,
    hf_train_call,
    import_transformers,
    output_differences,
    to_hf_state_dict,
    vary_constant_tensors,
)

from detr_d2.errors import UserInputError

from helpers import build_model_no_weights, load_tool, tiny_cfg

HF = "model.backbone.model."


@pytest.fixture(scope="module")
def tiny_model():
    return build_model_no_weights(tiny_cfg())


def test_every_weight_gets_a_hugging_face_name(tiny_model):
    ours = tiny_model.state_dict()
    converted, unmapped = to_hf_state_dict(ours)
    assert unmapped == []
    packed = [k for k in ours if ".in_proj_" in k]
    assert len(packed) == 2 * 2 + 2 * 2 * 2  # encoder: self; decoder: self + cross; weight, bias
    assert len(converted) == len(ours) + 2 * len(packed)  # each packed tensor becomes three
    expected = {
        "backbone.stem.conv1.weight": HF + "embedder.embedder.convolution.weight",
        "backbone.stem.conv1.norm.running_var": HF + "embedder.embedder.normalization.running_var",
        "backbone.res3.0.conv2.weight": HF + "encoder.stages.1.layers.0.layer.1.convolution.weight",
        "backbone.res5.1.conv1.norm.bias": HF
        + "encoder.stages.3.layers.1.layer.0.normalization.bias",
        "backbone.res4.0.shortcut.norm.weight": HF
        + "encoder.stages.2.layers.0.shortcut.normalization.weight",
        "transformer.encoder.layers.1.norm2.weight": "model.encoder.layers.1.final_layer_norm.weight",
        "transformer.decoder.layers.0.norm2.bias": "model.decoder.layers.0.encoder_attn_layer_norm.bias",
        "transformer.decoder.layers.1.multihead_attn.out_proj.weight": (
            "model.decoder.layers.1.encoder_attn.o_proj.weight"
        ),
        "transformer.decoder.norm.weight": "model.decoder.layernorm.weight",
        "query_embed.weight": "model.query_position_embeddings.weight",
        "class_embed.bias": "class_labels_classifier.bias",
        "bbox_embed.layers.2.weight": "bbox_predictor.layers.2.weight",
    }
    for key, hf_name in expected.items():
        assert torch.equal(converted[hf_name], ours[key]), key
    # nn.MultiheadAttention packs the query, key and value projections in this order
    packed_weight = ours["transformer.decoder.layers.1.multihead_attn.in_proj_weight"]
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        hf_name = f"model.decoder.layers.1.encoder_attn.{name}.weight"
        assert torch.equal(converted[hf_name], packed_weight[64 * index : 64 * (index + 1)]), name


def test_missing_transformers_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(UserInputError, match="pip install --target"):
        import_transformers(str(tmp_path / "absent"))
    monkeypatch.setattr(sys, "argv", ["benchmark_peer.py"])
    tool = load_tool("benchmark_peer")
    status = cli.run(tool.main, ["--peer-path", str(tmp_path / "absent")])
    error = capsys.readouterr().err.strip()
    assert status == cli.USER_ERROR_EXIT
    assert error.count("\n") == 0 and "pip install --target" in error, error
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserInputError, match="cannot import transformers"):
            import_transformers(str(tmp_path))  # a folder without it


def test_hugging_face_detr_matches_ours_with_the_same_weights(tiny_model, monkeypatch):
    if not os.environ.get(PEER_PATH_ENV):
        pytest.skip(f"transformers not available: set {PEER_PATH_ENV} to a folder holding it")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    transformers = import_transformers(os.environ[PEER_PATH_ENV])
    cfg = tiny_cfg()
    model = build_model_no_weights(cfg)
    hf_model = transformers.DetrForObjectDetection(hf_detr_config(transformers, cfg))
    assert vary_constant_tensors(model, seed=0) > 0
    copy_weights(model, hf_model)
    batch = synthetic_batch(2, 64, 80, num_classes=3, seed=0, with_targets=True)
    differences = output_differences(model, hf_model, batch[0])
    assert differences["logits_max_abs_diff"] < 1e-4, differences
    assert differences["boxes_max_abs_diff"] < 1e-4, differences
    model.train()
    step, losses = hf_train_call(cfg, hf_model, hf_inputs(model, batch))
    step()
    assert torch.isfinite(torch.tensor(losses)).all()
