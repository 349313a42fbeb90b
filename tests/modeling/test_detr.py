"""The Detr meta-architecture itself: construction from a config, the consistency checks of a
directly constructed model (deep supervision, class count, class activation), the auxiliary
outputs and per-layer losses of deep supervision, and the inference output format. Tiny models
with random weights (``helpers.tiny_cfg``)."""

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from detr_d2.modeling import Detr
from detr_d2.modeling.criterion import SetCriterion, build_weight_dict
from detr_d2.modeling.detr import num_aux_layers
from detr_d2.modeling.matcher import HungarianMatcher
from detr_d2.modeling.postprocessing import PostprocessOptions
from detr_d2.modeling.training_aids import DenseAuxHead
from detr_d2.modeling.transformer import Transformer

from helpers import build_model_no_weights, tiny_cfg

FINAL_KEYS = {"loss_ce", "loss_bbox", "loss_giou"}
BASE_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def training_batch():
    """Two images of different sizes (so one is padded), the second without ground truth."""
    torch.manual_seed(3)
    first = Instances((64, 96))
    first.gt_boxes = Boxes(torch.tensor([[8.0, 6.0, 40.0, 50.0], [50.0, 20.0, 90.0, 60.0]]))
    first.gt_classes = torch.tensor([0, 2])
    second = Instances((48, 80))
    second.gt_boxes = Boxes(torch.zeros(0, 4))
    second.gt_classes = torch.zeros(0, dtype=torch.int64)
    return [
        {"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8), "instances": first},
        {"image": torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8), "instances": second},
    ]


def training_losses(model):
    model.train()
    with EventStorage(0):
        return model(training_batch())


def constructor_arguments(**detr):
    """The keyword arguments ``from_config`` gives ``Detr`` for a tiny config."""
    torch.manual_seed(0)
    return Detr.from_config(tiny_cfg(**detr))


def transformer(return_intermediate_dec, num_decoder_layers=3):
    return Transformer(
        d_model=64,
        nhead=4,
        num_encoder_layers=1,
        num_decoder_layers=num_decoder_layers,
        dim_feedforward=128,
        return_intermediate_dec=return_intermediate_dec,
    )


def criterion(num_aux_layers, num_classes=3, class_loss="softmax"):
    weights = build_weight_dict(BASE_WEIGHTS, num_aux_layers)
    return SetCriterion(num_classes, HungarianMatcher(), weights, 0.1, class_loss=class_loss)


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("deep", [True, False])
def test_from_config_sets_deep_supervision_once(deep):
    """DEEP_SUPERVISION reaches the transformer only; the model's auxiliary outputs and the
    criterion's ``_{i}`` weights follow from it (L - 1 = 2 auxiliary layers, or none)."""
    model = build_model_no_weights(tiny_cfg("MODEL.DETR.LOSS.DEEP_SUPERVISION", deep, DEC_LAYERS=3))
    assert model.transformer.decoder.return_intermediate is deep
    assert model.aux_loss is deep
    assert (
        num_aux_layers(model.transformer) == model.criterion.num_aux_layers() == (2 if deep else 0)
    )
    expected = set(BASE_WEIGHTS) | (
        {f"{k}_{i}" for k in BASE_WEIGHTS for i in (0, 1)} if deep else set()
    )
    assert set(model.criterion.weight_dict) == expected
    assert model.criterion.weight_dict.get("loss_bbox_1") == (5.0 if deep else None)


@pytest.mark.parametrize(
    "class_loss, activation", [("softmax", "softmax"), ("focal", "sigmoid"), ("ia_bce", "sigmoid")]
)
def test_from_config_class_head_matches_the_criterion(class_loss, activation):
    """K + 1 class logits for every class loss (the sigmoid losses leave the last unused)."""
    model = build_model_no_weights(
        tiny_cfg("MODEL.DETR.LOSS.CLASS_LOSS", class_loss, NUM_CLASSES=5)
    )
    assert model.class_embed.out_features == 6 and model.criterion.num_classes == 5
    assert model.criterion.empty_weight.shape == (6,)
    assert model.postprocess.score_activation == activation
    assert model.criterion.class_loss == class_loss


def test_direct_construction_with_consistent_arguments():
    arguments = constructor_arguments(DEC_LAYERS=3)
    arguments.update(transformer=transformer(True), criterion=criterion(2))
    model = Detr(**arguments)
    assert model.aux_loss is True and model.criterion.num_aux_layers() == 2
    arguments.update(aux_loss=True, transformer=transformer(True), criterion=criterion(2))
    assert Detr(**arguments).aux_loss is True  # an explicit, agreeing aux_loss is accepted
    arguments.update(aux_loss=None, transformer=transformer(False), criterion=criterion(0))
    assert Detr(**arguments).aux_loss is False
    arguments.update(postprocess=None)  # the default: instances with softmax scores
    assert Detr(**arguments).postprocess == PostprocessOptions(num_classes=3)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(aux_loss=False),
            r"aux_loss=False but the transformer has return_intermediate_dec=True",
        ),
        (
            dict(transformer=transformer(False)),
            r"aux_loss=True but the transformer has return_intermediate_dec=False",
        ),
        (
            dict(aux_loss=None, transformer=transformer(False)),
            r"criterion.weight_dict weights 2 auxiliary decoder layers, the model supervises 0 "
            r"\(transformer num_decoder_layers=3, return_intermediate_dec=False\): .*"
            r"build_weight_dict\(base_weights, 0\)",
        ),
        (
            dict(aux_loss=None, criterion=criterion(0)),
            r"criterion.weight_dict weights 0 auxiliary decoder layers, the model supervises 2",
        ),
        (
            dict(aux_loss=None, transformer=transformer(True, num_decoder_layers=6)),
            r"weights 2 auxiliary decoder layers, the model supervises 5 .*num_decoder_layers=6",
        ),
        (dict(criterion=criterion(2, num_classes=4)), r"criterion.num_classes=4 but num_classes=3"),
        (dict(num_classes=4), r"criterion.num_classes=3 but num_classes=4: the class head has "),
        (
            dict(criterion=criterion(2, class_loss="focal")),
            r"score_activation='softmax' but criterion.class_loss='focal'",
        ),
        (
            dict(postprocess=PostprocessOptions(3, score_activation="sigmoid")),
            r"score_activation='sigmoid' but criterion.class_loss='softmax'",
        ),
        (
            dict(postprocess=PostprocessOptions(4)),
            r"postprocess has num_classes=4, mask_on=False but the model num_classes=3",
        ),
        (
            dict(training_aids=[DenseAuxHead(64, 2)]),
            r"dense_head.num_classes=2 but num_classes=3",
        ),
    ],
)
def test_inconsistent_direct_construction_is_refused(change, message):
    arguments = constructor_arguments(DEC_LAYERS=3)
    arguments.update({"aux_loss": True, **change})
    with pytest.raises(ValueError, match=message):
        Detr(**arguments)


def test_incomplete_auxiliary_weights_are_refused():
    weights = build_weight_dict(BASE_WEIGHTS, 2)
    del weights["loss_giou_1"]
    broken = SetCriterion(3, HungarianMatcher(), weights, 0.1)
    with pytest.raises(ValueError, match=r"up to _1 but lacks \['loss_giou_1'\]"):
        broken.num_aux_layers()
    arguments = constructor_arguments(DEC_LAYERS=3)
    arguments.update(criterion=broken)
    with pytest.raises(ValueError, match=r"lacks \['loss_giou_1'\]"):
        Detr(**arguments)


# ---------------------------------------------------------------- deep supervision
@pytest.mark.parametrize("dec_layers", [1, 2, 4])
@pytest.mark.parametrize("deep", [True, False])
def test_auxiliary_outputs_are_one_per_earlier_decoder_layer(dec_layers, deep):
    model = build_model_no_weights(
        tiny_cfg("MODEL.DETR.LOSS.DEEP_SUPERVISION", deep, DEC_LAYERS=dec_layers)
    ).train()
    batch = training_batch()
    outputs = model.forward_heads(model.preprocess_image(batch))
    assert len(outputs.get("aux_outputs", [])) == (dec_layers - 1 if deep else 0)
    for aux in outputs.get("aux_outputs", []):
        assert aux["pred_logits"].shape == outputs["pred_logits"].shape == (2, 7, 4)
        assert aux["pred_boxes"].shape == outputs["pred_boxes"].shape == (2, 7, 4)
    raw = model.eval().predict_raw(batch)
    assert len(raw.get("aux_outputs", [])) == (dec_layers - 1 if deep else 0)


@pytest.mark.parametrize("deep", [True, False])
def test_training_returns_the_per_layer_loss_keys(deep):
    losses = training_losses(
        build_model_no_weights(tiny_cfg("MODEL.DETR.LOSS.DEEP_SUPERVISION", deep, DEC_LAYERS=3))
    )
    aux = {f"{k}_{i}" for k in FINAL_KEYS for i in (0, 1)} if deep else set()
    assert set(losses) == FINAL_KEYS | aux
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value) and value > 0, key
    sum(losses.values()).backward()


def test_deep_supervision_only_adds_the_auxiliary_terms():
    """Same weights with and without deep supervision: the final layer's losses are equal, and
    the ``_0`` terms are those of a one-layer decoder with the first layer's weights (the decoder
    norm is shared by all layers' outputs)."""
    deep = build_model_no_weights(tiny_cfg("MODEL.DETR.LOSS.DEEP_SUPERVISION", True, DEC_LAYERS=2))
    plain = build_model_no_weights(
        tiny_cfg("MODEL.DETR.LOSS.DEEP_SUPERVISION", False, DEC_LAYERS=2)
    )
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in deep.state_dict().items())
    first_layer = build_model_no_weights(
        tiny_cfg("MODEL.DETR.LOSS.DEEP_SUPERVISION", False, DEC_LAYERS=1)
    )
    unexpected = first_layer.load_state_dict(deep.state_dict(), strict=False).unexpected_keys
    assert unexpected and all(k.startswith("transformer.decoder.layers.1.") for k in unexpected)
    with_aux, without, one_layer = map(training_losses, (deep, plain, first_layer))
    assert set(with_aux) - set(without) == {f"{k}_0" for k in FINAL_KEYS}
    for key in FINAL_KEYS:
        torch.testing.assert_close(with_aux[key], without[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(with_aux[f"{key}_0"], one_layer[key], rtol=0, atol=1e-5)
    assert not torch.isclose(with_aux["loss_bbox"], with_aux["loss_bbox_0"])


def test_auxiliary_terms_use_their_own_weights():
    """``loss_*_{i}`` are weighted by ``weight_dict`` like the final layer's terms."""
    model = build_model_no_weights(tiny_cfg(DEC_LAYERS=2))
    unweighted = training_losses(model)
    model.criterion.weight_dict["loss_bbox_0"] *= 3.0
    reweighted = training_losses(model)
    torch.testing.assert_close(reweighted["loss_bbox_0"], 3.0 * unweighted["loss_bbox_0"])
    torch.testing.assert_close(reweighted["loss_bbox"], unweighted["loss_bbox"])


# ---------------------------------------------------------------- inference
def test_inference_returns_instances_at_the_requested_size():
    model = build_model_no_weights(tiny_cfg(DEC_LAYERS=2)).eval()
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        own_size, doubled = model([{"image": image}, {"image": image, "height": 128, "width": 192}])
    for result, (height, width) in ((own_size, (64, 96)), (doubled, (128, 192))):
        assert set(result) == {"instances"}
        instances = result["instances"]
        assert instances.image_size == (height, width)
        assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        assert len(instances) == 7  # every query, as the official PostProcess
        boxes = instances.pred_boxes.tensor
        # boxes are not clipped (official), but centres and sizes are within the image
        centres = instances.pred_boxes.get_centers()
        assert (centres >= 0).all() and (centres[:, 0] <= width).all()
        assert (centres[:, 1] <= height).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((boxes[:, 2] - boxes[:, 0]) <= width).all()
        assert ((boxes[:, 3] - boxes[:, 1]) <= height).all()
        assert ((instances.scores > 0) & (instances.scores <= 1)).all()
        assert instances.pred_classes.dtype == torch.int64
        assert ((instances.pred_classes >= 0) & (instances.pred_classes < 3)).all()
    torch.testing.assert_close(
        doubled["instances"].pred_boxes.tensor, 2 * own_size["instances"].pred_boxes.tensor
    )
    torch.testing.assert_close(doubled["instances"].scores, own_size["instances"].scores)


def test_inference_scores_are_the_best_non_background_probability():
    model = build_model_no_weights(tiny_cfg(DEC_LAYERS=2)).eval()
    inputs = [{"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)}]
    raw = model.predict_raw(inputs)
    with torch.no_grad():
        (instances,) = model.inference(inputs, do_postprocess=False)
    probabilities = raw["pred_logits"][0].softmax(-1)[:, :-1]  # [Q, K], "no object" left out
    torch.testing.assert_close(instances.scores, probabilities.max(-1).values)
    assert torch.equal(instances.pred_classes, probabilities.argmax(-1))
