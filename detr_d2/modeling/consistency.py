"""Checks that the parts handed to :class:`~detr_d2.modeling.detr.Detr` fit together, for models
constructed directly (``from_config`` builds consistent parts). Each raises ``ValueError``
naming the arguments or config keys and the fix."""

from collections.abc import Sequence

from detectron2.modeling import Backbone

from .criterion import SetCriterion
from .postprocessing import PostprocessOptions
from .training_aids import TrainingAid
from .transformer import Transformer, num_aux_layers


def check_inputs(
    backbone: Backbone,
    in_feature: str,
    input_format: str,
    mask_on: bool,
    freeze_detr: bool,
    postprocess: PostprocessOptions,
) -> None:
    """An unusable backbone output or input format, and mask outputs (semantic, panoptic or
    stage 2) without a mask head or with sigmoid scores."""
    if in_feature not in backbone.output_shape():
        raise ValueError(
            f"MODEL.DETR.IN_FEATURE={in_feature!r} is not a backbone output; available: "
            f"{list(backbone.output_shape())}."
        )
    if input_format not in ("RGB", "BGR"):
        raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for DETR, got {input_format!r}.")
    if (postprocess.semantic_on or postprocess.panoptic_on or freeze_detr) and not mask_on:
        raise ValueError(
            "MODEL.DETR.TEST.SEMANTIC_ON, MODEL.DETR.TEST.PANOPTIC_ON and "
            "MODEL.DETR.FREEZE_DETR need the mask head: set MODEL.MASK_ON True."
        )
    if postprocess.score_activation == "sigmoid" and mask_on:
        raise ValueError(
            "MODEL.DETR.LOSS.CLASS_LOSS focal/ia_bce (sigmoid scores) is not supported with "
            "MODEL.MASK_ON: panoptic inference follows the official softmax scores."
        )


def check_criterion(
    transformer: Transformer,
    criterion: SetCriterion,
    num_classes: int,
    aux_loss: bool | None,
    score_activation: str,
) -> None:
    """The criterion and class head must agree with the model: deep supervision, class count
    and class activation."""
    deep = bool(transformer.decoder.return_intermediate)
    if aux_loss is not None and bool(aux_loss) != deep:
        raise ValueError(
            f"aux_loss={aux_loss} but the transformer has return_intermediate_dec={deep}: deep "
            "supervision is the transformer's setting (MODEL.DETR.LOSS.DEEP_SUPERVISION). Leave "
            "aux_loss out, or build the transformer with the same value."
        )
    expected, weighted = num_aux_layers(transformer), criterion.num_aux_layers()
    if weighted != expected:
        raise ValueError(
            f"criterion.weight_dict weights {weighted} auxiliary decoder layers, the model "
            f"supervises {expected} (transformer num_decoder_layers={len(transformer.decoder.layers)}"
            f", return_intermediate_dec={deep}): build the criterion's weight_dict with "
            f"build_weight_dict(base_weights, {expected})."
        )
    if criterion.num_classes != num_classes:
        raise ValueError(
            f"criterion.num_classes={criterion.num_classes} but num_classes={num_classes}: the "
            f'class head has num_classes + 1 = {num_classes + 1} outputs (the last is "no '
            'object"), and the criterion must score the same classes. Pass the same count to '
            "both."
        )
    # the sigmoid losses (focal, ia_bce) train independent class probabilities: score with sigmoid
    wanted = "softmax" if criterion.class_loss == "softmax" else "sigmoid"
    if score_activation != wanted:
        raise ValueError(
            f"score_activation={score_activation!r} but criterion.class_loss="
            f"{criterion.class_loss!r}: a {criterion.class_loss} class loss needs "
            f"score_activation={wanted!r}."
        )


def check_postprocess(postprocess: PostprocessOptions, num_classes: int, mask_on: bool) -> None:
    """The post-processing options are those of the model's classes and mask head."""
    if (postprocess.num_classes, postprocess.mask_on) != (num_classes, mask_on):
        raise ValueError(
            f"postprocess has num_classes={postprocess.num_classes}, mask_on="
            f"{postprocess.mask_on} but the model num_classes={num_classes}, mask_on={mask_on}: "
            "build the PostprocessOptions with the model's values (or pass None for defaults)."
        )


def check_aids(aids: Sequence[TrainingAid], num_classes: int, mask_on: bool) -> None:
    """Training aids are for a box model, and of the model's ``num_classes``."""
    for aid in aids:
        if mask_on:
            raise ValueError(
                f"{aid.config_key} is a box-model training aid: set it in the box stage, not "
                "with MODEL.MASK_ON."
            )
        aid_classes = getattr(aid, "num_classes", num_classes)
        if aid_classes != num_classes:
            raise ValueError(
                f"{aid.slot}.num_classes={aid_classes} but num_classes={num_classes}: build the "
                "training aid with the model's class count."
            )
