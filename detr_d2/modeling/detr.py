"""DETR as a Detectron2 meta-architecture (Carion et al., "End-to-End Object Detection with
Transformers", 2020).

Shapes: N images, Q object queries, K classes (+1 "no object" logit), C hidden dim,
L decoder layers, H x W the transformer's input feature map, H4 x W4 the mask logits' grid (1/4
of the padded batch).

With ``MODEL.MASK_ON`` the model is the official ``DETRsegm``: the same trunk plus a mask head
(:mod:`.segmentation`); inference can then return instance masks, semantic scores and panoptic
segmentations (``MODEL.DETR.TEST.{INSTANCE,SEMANTIC,PANOPTIC}_ON``).
"""

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import BitMasks, ImageList, PolygonMasks
from torch import nn

from ..checkpoint import (
    convert_official_for_model,
    is_official_detr_state_dict,
    torchvision_resnet_as_official,
)
from ..checkpoint_fit import check_checkpoint_fits
from ..finetune import CheckpointInit, adapt_heads, checkpoint_class_layout
from ..layout import ClassLayout, generic_layout, layout_from_cfg
from ..precision import autocast, precision_dtype, to_float32
from .box_ops import box_xyxy_to_cxcywh
from .criterion import SetCriterion, build_weight_dict
from .dense_head import DenseAuxHead
from .feature_cache import FeatureCache
from .frozen_backbone import FoldedBackbone, has_foldable_frozen_part
from .matcher import HungarianMatcher
from .position_encoding import build_position_encoding
from .postprocessing import (
    PostprocessOptions,
    image_sizes_tensor,
    inference_results,
    instances_results,
)
from .segmentation import MASK_HEAD_IN_FEATURES, MaskAttentionMap, MaskHead
from .training_queries import DenoisingQueries, TrainingQueries, block_diagonal_mask
from .transformer import Transformer

logger = logging.getLogger(__name__)

__all__ = ["Detr", "MLP", "num_aux_layers"]


class MLP(nn.Module):
    """Feed-forward network with ReLU between layers (DETR's box head, paper Sec. 3.2)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def _denoising_queries(detr_cfg, num_classes: int) -> DenoisingQueries | None:
    """``MODEL.DETR.DENOISING``'s queries, or None when its GROUPS is 0."""
    groups = detr_cfg.DENOISING.GROUPS
    if groups < 0:
        raise ValueError(f"MODEL.DETR.DENOISING.GROUPS must be >= 0 (0 = off), got {groups}.")
    if groups == 0:
        return None
    return DenoisingQueries(
        hidden_dim=detr_cfg.HIDDEN_DIM,
        num_classes=num_classes,
        num_groups=groups,
        box_noise=detr_cfg.DENOISING.BOX_NOISE,
        label_noise=detr_cfg.DENOISING.LABEL_NOISE,
    )


def _layer_outputs(layer_logits: torch.Tensor, layer_boxes: torch.Tensor) -> dict:
    """[L, ...] logits and boxes of every decoder layer -> the criterion's outputs dict: the
    last layer's, with the earlier ones under ``aux_outputs``."""
    outputs = {"pred_logits": layer_logits[-1], "pred_boxes": layer_boxes[-1]}
    if len(layer_logits) > 1:
        outputs["aux_outputs"] = [
            {"pred_logits": a, "pred_boxes": b} for a, b in zip(layer_logits[:-1], layer_boxes[:-1])
        ]
    return outputs


def num_aux_layers(transformer: Transformer) -> int:
    """The decoder layers before the last whose outputs are supervised: L - 1 when the decoder
    returns every layer's output (deep supervision, the paper's auxiliary decoding losses,
    Sec. 3.2), else 0."""
    decoder = transformer.decoder
    return len(decoder.layers) - 1 if decoder.return_intermediate else 0


def _check_consistency(
    transformer: Transformer,
    criterion: SetCriterion,
    num_classes: int,
    aux_loss: bool | None,
    score_activation: str,
    dense_head: DenseAuxHead | None,
) -> None:
    """Raise ValueError, naming the arguments, unless the criterion and heads given to
    :class:`Detr` agree with the model: deep supervision, class count and class activation."""
    deep = bool(transformer.decoder.return_intermediate)
    if aux_loss is not None and bool(aux_loss) != deep:
        raise ValueError(
            f"aux_loss={aux_loss} but the transformer has return_intermediate_dec={deep}: deep "
            "supervision is the transformer's setting (MODEL.DETR.DEEP_SUPERVISION). Leave "
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
    if dense_head is not None and dense_head.num_classes != num_classes:
        raise ValueError(
            f"dense_head.num_classes={dense_head.num_classes} but num_classes={num_classes}: "
            "build the dense head with the model's class count."
        )
    # the sigmoid losses (focal, ia_bce) train independent class probabilities: score with sigmoid
    wanted = "softmax" if criterion.class_loss == "softmax" else "sigmoid"
    if score_activation != wanted:
        raise ValueError(
            f"score_activation={score_activation!r} but criterion.class_loss="
            f"{criterion.class_loss!r}: a {criterion.class_loss} class loss needs "
            f"score_activation={wanted!r}."
        )


@META_ARCH_REGISTRY.register()
class Detr(nn.Module):
    """Backbone -> 1x1 projection -> transformer -> class and box heads, one set per query.

    Training returns the weighted set-prediction losses; inference returns, per image, an
    ``Instances`` with every query's box, score and class (see :meth:`inference`).

    With ``mask_on`` it also predicts one mask per query (``bbox_attention`` + ``mask_head``,
    official names) and can freeze everything else for the official second training stage.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str,
        position_embedding: nn.Module,
        transformer: Transformer,
        num_classes: int,
        num_queries: int,
        aux_loss: bool | None = None,
        criterion: SetCriterion,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        input_format: str = "RGB",
        # segmentation
        mask_on: bool = False,
        freeze_detr: bool = False,
        # inference outputs
        instance_on: bool = True,
        semantic_on: bool = False,
        panoptic_on: bool = False,
        thing_ids: Sequence[int] | None = None,
        class_layout: ClassLayout | None = None,
        panoptic_threshold: float = 0.85,
        mask_threshold: float = 0.5,
        # speed
        test_precision: torch.dtype = torch.float32,
        channels_last: bool = False,
        # training-only convergence aids (docs/convergence.md)
        training_queries: TrainingQueries | None = None,
        one_to_many_repeat: int = 6,
        one_to_many_weight: float = 1.0,
        score_activation: str = "softmax",
        dense_head: DenseAuxHead | None = None,
        dense_weight: float = 1.0,
        denoising: DenoisingQueries | None = None,
        denoising_weight: float = 1.0,
        size_divisibility_train: int = 0,
        checkpoint_init: CheckpointInit | None = None,
        feature_cache: FeatureCache | None = None,
    ):
        """
        Args:
            backbone: a Detectron2 backbone; ``in_feature`` names the output the transformer uses.
            position_embedding: maps a padding mask [N, H, W] to encodings [N, C, H, W].
            transformer: encoder-decoder of width C = ``transformer.d_model``.
            num_classes: K; the class head has K + 1 outputs, the last is "no object" (unused
                by the sigmoid class losses). ``criterion.num_classes`` must be K.
            num_queries: Q object queries.
            aux_loss: deep supervision (predict and supervise after every decoder layer) is the
                transformer's ``return_intermediate_dec``; ``None`` follows it, ``True``/``False``
                must equal it.
            criterion: the set-prediction loss, used in training only. Its ``weight_dict`` must
                weight the L - 1 auxiliary layers the transformer supervises (``_{i}`` keys, see
                :func:`~.criterion.build_weight_dict`), or none without deep supervision.
            pixel_mean, pixel_std: per-channel normalization, in ``input_format`` order (0-255).
            input_format: "RGB" or "BGR" channel order of the input images; the backbone always
                receives RGB, as the official (torchvision) weights expect.
            mask_on: add the mask head (needs the backbone outputs res2, res3, res4).
            freeze_detr: train only the mask head: every other parameter gets
                ``requires_grad=False`` and batch norms become frozen (official stage 2).
            instance_on: inference returns ``instances`` (with ``pred_masks`` if ``mask_on``).
            semantic_on: inference returns ``sem_seg`` [K, H, W] (needs ``mask_on``).
            panoptic_on: inference returns ``panoptic_seg`` (needs ``mask_on``).
            thing_ids: the classes that are things; ``None``: all classes are things. Instances
                are restricted to them, and panoptic segments of other classes are stuff.
            class_layout: names, thing flags and dataset category ids of the K classes (default:
                numbered names); official checkpoints are remapped to it on load.
            panoptic_threshold: class probability a query needs to enter the panoptic output.
            mask_threshold: probability threshold of the binary instance masks.
            test_precision: dtype of the network in inference (autocast; fp32 post-processing).
            channels_last: backbone weights and inputs in channels-last (NHWC) memory format.
            training_queries: extra query groups (Group DETR) and one-to-many queries (H-DETR),
                used in training only; inference runs the plain queries.
            dense_head: a training-only dense detection head on the encoder output.
            dense_weight: weight of its losses.
            denoising: training-only denoising queries (DN-DETR), or None.
            denoising_weight: weight of their losses.
            size_divisibility_train: pad training batches to a multiple of this (0: to the
                largest image, as the official batching): few distinct batch shapes let oneDNN
                reuse its convolution kernels instead of creating new ones for every batch.
            checkpoint_init: how a checkpoint of other classes or another query count starts
                the class head and queries (``MODEL.DETR.INIT``, :mod:`detr_d2.finetune`).
            feature_cache: training only, the frozen backbone stages' output of each view
                computed once (``MODEL.DETR.FEATURE_CACHE``, :mod:`.feature_cache`), or None.
            one_to_many_repeat: k, how often each target is repeated for the one-to-many set.
            one_to_many_weight: weight of the one-to-many losses relative to the plain ones.
            score_activation: "softmax" (official) or "sigmoid" (models trained with a sigmoid
                classification loss): how inference turns logits into scores; "sigmoid" exactly
                when ``criterion.class_loss`` is "focal" or "ia_bce".
        """
        super().__init__()
        if in_feature not in backbone.output_shape():
            raise ValueError(
                f"MODEL.DETR.IN_FEATURE={in_feature!r} is not a backbone output; available: "
                f"{list(backbone.output_shape())}."
            )
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for DETR, got {input_format!r}.")
        _check_consistency(
            transformer, criterion, num_classes, aux_loss, score_activation, dense_head
        )
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.in_feature = in_feature
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.input_proj = nn.Conv2d(backbone.output_shape()[in_feature].channels, hidden_dim, 1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = bool(transformer.decoder.return_intermediate)
        self.criterion = criterion
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        if (semantic_on or panoptic_on or freeze_detr) and not mask_on:
            raise ValueError(
                "MODEL.DETR.TEST.SEMANTIC_ON, MODEL.DETR.TEST.PANOPTIC_ON and "
                "MODEL.DETR.FREEZE_DETR need the mask head: set MODEL.MASK_ON True."
            )
        self.mask_on = mask_on
        if mask_on:
            shapes = backbone.output_shape()
            missing = [f for f in MASK_HEAD_IN_FEATURES if f not in shapes]
            if missing:
                raise ValueError(
                    f"MODEL.MASK_ON needs the backbone outputs {list(MASK_HEAD_IN_FEATURES)}, "
                    f"missing {missing}: set MODEL.RESNETS.OUT_FEATURES "
                    "['res2', 'res3', 'res4', 'res5']."
                )
            self.bbox_attention = MaskAttentionMap(hidden_dim, transformer.nhead)
            self.mask_head = MaskHead(
                hidden_dim, transformer.nhead, [shapes[f].channels for f in MASK_HEAD_IN_FEATURES]
            )
        if freeze_detr:
            self._freeze_detection()
        self.instance_on = instance_on
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.thing_ids = None if thing_ids is None else tuple(int(i) for i in thing_ids)
        self.class_layout = class_layout or generic_layout(num_classes)
        assert self.class_layout.num_classes == num_classes, (
            f"class_layout has {self.class_layout.num_classes} classes, the model {num_classes}"
        )
        self.panoptic_threshold = panoptic_threshold
        self.mask_threshold = mask_threshold
        self.test_precision = test_precision
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # frozen backbone stages train as a copy with folded batch norms (not a submodule)
        self._folded_backbone = FoldedBackbone(channels_last)

        if score_activation == "sigmoid" and mask_on:
            raise ValueError(
                "MODEL.DETR.CLASS_LOSS focal/ia_bce (sigmoid scores) is not supported with "
                "MODEL.MASK_ON: panoptic inference follows the official softmax scores."
            )
        self.score_activation = score_activation
        if score_activation == "sigmoid":
            # focal-loss prior (Lin et al. 2017): every class starts at probability 0.01
            nn.init.constant_(self.class_embed.bias, -math.log(99.0))
        # Parts that exist only for training; the inference model drops them (inference_graph).
        self.train_only = nn.ModuleDict()
        aids = {
            "queries": ("MODEL.DETR.GROUPS > 1 and MODEL.DETR.ONE_TO_MANY", training_queries),
            "dense_head": ("MODEL.DETR.DENSE_AUX", dense_head),
            "denoising": ("MODEL.DETR.DENOISING", denoising),
        }
        for name, (keys, module) in aids.items():
            if module is None or (name == "queries" and not module.active):
                continue
            if mask_on:
                raise ValueError(
                    f"{keys} are box-model training aids: set them in the box stage, not with "
                    "MODEL.MASK_ON."
                )
            self.train_only[name] = module
        self.one_to_many_repeat = one_to_many_repeat
        self.one_to_many_weight = one_to_many_weight
        self.dense_weight = dense_weight
        self.denoising_weight = denoising_weight
        self.size_divisibility_train = size_divisibility_train
        self.checkpoint_init = checkpoint_init or CheckpointInit()
        if feature_cache is not None:
            feature_cache.check_backbone(backbone)
        self.feature_cache = feature_cache  # no module: no checkpoint keys, no state to resume

    def _freeze_detection(self) -> None:
        """Official stage 2 (``--frozen_weights``): only ``bbox_attention`` and ``mask_head``
        train. Batch norms become ``FrozenBatchNorm2d`` so that their statistics stay those of
        the stage-1 model (the official backbone uses frozen batch norm anyway)."""
        self.backbone = FrozenBatchNorm2d.convert_frozen_batchnorm(self.backbone)
        for name, parameter in self.named_parameters():
            if not name.startswith(("bbox_attention.", "mask_head.")):
                parameter.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        detr = cfg.MODEL.DETR
        layout = layout_from_cfg(cfg)  # NUM_CLASSES 0: the dataset's count
        backbone = build_backbone(cfg)
        sigmoid = detr.CLASS_LOSS != "softmax"
        matcher = HungarianMatcher(
            cost_class=detr.COST_CLASS,
            cost_bbox=detr.COST_BBOX,
            cost_giou=detr.COST_GIOU,
            class_cost="focal" if sigmoid else "softmax",
            focal_alpha=detr.FOCAL_ALPHA,
            focal_gamma=detr.FOCAL_GAMMA,
        )
        base_weights = {
            "loss_ce": detr.CLASS_WEIGHT,
            "loss_bbox": detr.L1_WEIGHT,
            "loss_giou": detr.GIOU_WEIGHT,
        }
        losses = ("labels", "boxes")
        if cfg.MODEL.MASK_ON:
            base_weights.update(loss_mask=detr.MASK_WEIGHT, loss_dice=detr.DICE_WEIGHT)
            losses += ("masks",)
        # deep supervision is set once, in the transformer; the criterion's auxiliary-layer
        # weights and the model's auxiliary outputs follow it
        transformer = Transformer(
            d_model=detr.HIDDEN_DIM,
            nhead=detr.NHEADS,
            num_encoder_layers=detr.ENC_LAYERS,
            num_decoder_layers=detr.DEC_LAYERS,
            dim_feedforward=detr.DIM_FEEDFORWARD,
            dropout=detr.DROPOUT,
            normalize_before=detr.PRE_NORM,
            return_intermediate_dec=detr.DEEP_SUPERVISION,
            attention_fp32=detr.ATTENTION_FP32,
            fast_dropout=detr.FAST_DROPOUT,
            batch_first_training=detr.BATCH_FIRST_TRAINING,
        )
        criterion = SetCriterion(
            layout.num_classes,
            matcher=matcher,
            weight_dict=build_weight_dict(base_weights, num_aux_layers(transformer)),
            eos_coef=detr.NO_OBJECT_WEIGHT,
            losses=losses,
            class_loss=detr.CLASS_LOSS,
            focal_alpha=detr.FOCAL_ALPHA,
            focal_gamma=detr.FOCAL_GAMMA,
        )
        return {
            "backbone": backbone,
            "in_feature": detr.IN_FEATURE,
            "position_embedding": build_position_encoding(detr.POSITION_EMBEDDING, detr.HIDDEN_DIM),
            "transformer": transformer,
            "num_classes": layout.num_classes,
            "num_queries": detr.NUM_OBJECT_QUERIES,
            "criterion": criterion,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "input_format": cfg.INPUT.FORMAT,
            "mask_on": cfg.MODEL.MASK_ON,
            "freeze_detr": detr.FREEZE_DETR,
            "instance_on": detr.TEST.INSTANCE_ON,
            "semantic_on": detr.TEST.SEMANTIC_ON,
            "panoptic_on": detr.TEST.PANOPTIC_ON,
            "thing_ids": None if layout.all_things else list(layout.thing_ids),
            "class_layout": layout,
            "panoptic_threshold": detr.TEST.PANOPTIC_THRESHOLD,
            "mask_threshold": detr.TEST.MASK_THRESHOLD,
            "test_precision": precision_dtype(
                cfg.TEST.PRECISION, "TEST.PRECISION", torch.device(cfg.MODEL.DEVICE).type
            ),
            "channels_last": detr.CHANNELS_LAST,
            "training_queries": TrainingQueries(
                hidden_dim=detr.HIDDEN_DIM,
                num_queries=detr.NUM_OBJECT_QUERIES,
                num_groups=detr.GROUPS,
                num_one_to_many=detr.ONE_TO_MANY.NUM_QUERIES,
            ),
            "one_to_many_repeat": detr.ONE_TO_MANY.REPEAT,
            "one_to_many_weight": detr.ONE_TO_MANY.WEIGHT,
            "score_activation": "sigmoid" if sigmoid else "softmax",
            "dense_head": DenseAuxHead(detr.HIDDEN_DIM, layout.num_classes)
            if detr.DENSE_AUX.ENABLED
            else None,
            "dense_weight": detr.DENSE_AUX.WEIGHT,
            "denoising": _denoising_queries(detr, layout.num_classes),
            "denoising_weight": detr.DENOISING.WEIGHT,
            "size_divisibility_train": detr.SIZE_DIVISIBILITY_TRAIN,
            "checkpoint_init": CheckpointInit.from_config(cfg, layout.num_classes),
            "feature_cache": FeatureCache.from_config(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def convert_checkpoint_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        class_layout: dict | None = None,
        **declared,
    ) -> dict:
        """``state_dict`` in this model's layout: an official DETR one (torchvision backbone
        names, optional ``detr.`` prefix, class head indexed by COCO category id) is converted;
        the class head and queries of a checkpoint of other classes or another query count
        (``class_layout``: the names a detr_d2 checkpoint stores) are fitted to the model as
        ``MODEL.DETR.INIT`` says (:mod:`detr_d2.finetune`). Detectron2's checkpointers call this
        before their shape check (see :mod:`detr_d2.compat`). The result must fit the model
        (``declared``: what the file says it holds; :mod:`detr_d2.checkpoint_fit`). A torchvision
        ImageNet ResNet converts as the backbone of an official file."""
        state_dict = torchvision_resnet_as_official(state_dict)
        if is_official_detr_state_dict(state_dict):
            logger.warning(
                "Loading an official DETR state dict: converting it to detr_d2's layout."
            )
            state_dict = convert_official_for_model(
                state_dict, self, self.class_layout, self.checkpoint_init
            )
        else:
            state_dict = dict(state_dict)
            stored = checkpoint_class_layout(state_dict, class_layout)
            adapt_heads(
                state_dict, self.state_dict(), self.class_layout, self.checkpoint_init, stored
            )
        check_checkpoint_fits(self, state_dict, partial=self.checkpoint_init.partial, **declared)
        return state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Old (official DETR) layouts are converted here too, for plain ``load_state_dict``."""
        local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if is_official_detr_state_dict(local):
            converted = self.convert_checkpoint_state_dict(local)
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]
            state_dict.update({prefix + k: v for k, v in converted.items()})
        self._init_training_queries(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_training_queries(self, state_dict, prefix: str) -> None:
        """A checkpoint without the training-only queries (official, or trained without them)
        starts them from its own object queries, so fine-tuning keeps what they learned; checkpoints
        of a run with the same query sets (resume) load them as they are."""
        if "queries" not in self.train_only:
            return
        queries = self.train_only["queries"]
        own = {prefix + "train_only.queries." + k: v for k, v in queries.state_dict().items()}
        plain = state_dict.get(prefix + "query_embed.weight")
        if (
            all(k in state_dict for k in own)
            or plain is None
            or plain.shape != self.query_embed.weight.shape
        ):
            return
        queries.init_from_plain(plain.to(self.query_embed.weight))
        logger.info("Training-only query sets initialised from the checkpoint's object queries.")
        for key, value in queries.state_dict().items():
            state_dict.setdefault(prefix + "train_only.queries." + key, value.clone())

    # ---------------------------------------------------------------- shared trunk
    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalize, reorder to RGB and zero-pad at the bottom/right (no size divisibility, as
        the official batching); ``image_sizes`` keep the unpadded sizes."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        if self.input_format == "BGR":
            images = [x.flip(0) for x in images]
        divisibility = self.backbone.size_divisibility
        if self.training:
            divisibility = max(divisibility, self.size_divisibility_train)
        return ImageList.from_tensors(images, divisibility)

    @staticmethod
    def padding_mask(images: ImageList, size: tuple[int, int]) -> torch.Tensor:
        """bool [N, h, w], True on padding, for a feature map of ``size``.

        As the official implementation: built at input resolution from the unpadded sizes, then
        sampled with nearest interpolation to the feature map (a few padded rows can vanish).
        ``images.image_sizes`` may be an int64 tensor [N, 2] (exported graphs, see
        :mod:`detr_d2.export`) so that nothing in this path leaves the graph.
        """
        tensor = images.tensor
        heights_widths = image_sizes_tensor(images.image_sizes, tensor.device)  # [N, 2]
        ys = torch.arange(tensor.shape[-2], device=tensor.device)
        xs = torch.arange(tensor.shape[-1], device=tensor.device)
        mask = (ys[None, :, None] >= heights_widths[:, 0, None, None]) | (
            xs[None, None, :] >= heights_widths[:, 1, None, None]
        )  # [N, H, W]
        return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]

    def forward_heads(
        self, images: ImageList, with_aux: bool = True, targets: list[dict] | None = None
    ) -> dict:
        """Raw head outputs: ``pred_logits [N, Q, K+1]``, ``pred_boxes [N, Q, 4]`` (sigmoid
        cxcywh relative to each unpadded image), with ``mask_on`` ``pred_masks [N, Q, H4, W4]``
        (mask logits on the padded batch's grid) and, with deep supervision and ``with_aux``,
        ``aux_outputs``: L-1 dicts with ``pred_logits`` and ``pred_boxes`` for the earlier
        decoder layers (inference skips them). In training, ``targets`` (the criterion's) feed
        the training-only denoising queries, if any."""
        pixels = images.tensor
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.training and self.feature_cache is not None:
            features = self.feature_cache(self.backbone, self._folded_backbone, images)
        elif self.training and has_foldable_frozen_part(self.backbone):
            features = self._folded_backbone(self.backbone, pixels)
        else:
            features = self.backbone(pixels)
        feature = features[self.in_feature]
        mask = self.padding_mask(images, feature.shape[-2:])
        pos = self.position_embedding(mask).to(feature.dtype)
        projected = self.input_proj(feature)
        extra = (
            self.train_only["queries"] if self.training and "queries" in self.train_only else None
        )
        denoising = self._denoising_inputs(targets)
        if extra is None and denoising is None:
            hs, memory = self.transformer(projected, mask, self.query_embed.weight, pos)
        else:
            queries, attn_mask, content = self._training_queries(extra, denoising)
            hs, memory = self.transformer(projected, mask, queries, pos, attn_mask, content)
        with_aux = with_aux and self.aux_loss
        if not with_aux:
            hs = hs[-1:]
        logits = self.class_embed(hs)  # [L, N, Q, K+1] (training-only sets: [L, N, T, K+1])
        boxes = self.bbox_embed(hs).sigmoid()  # [L, N, Q, 4]
        if denoising is not None:
            plain_count = logits.shape[2] - denoising[1].shape[1]
            dn_logits, logits = logits[:, :, plain_count:], logits[:, :, :plain_count]
            dn_boxes, boxes = boxes[:, :, plain_count:], boxes[:, :, :plain_count]
        if extra is not None:
            outputs = self._training_set_outputs(extra, logits, boxes)
        elif denoising is not None:
            outputs = _layer_outputs(logits, boxes)
        else:
            outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if denoising is not None:
            dn = self.train_only["denoising"]
            per_group = denoising[2]
            outputs["denoising"] = _layer_outputs(
                dn.split(dn_logits, per_group), dn.split(dn_boxes, per_group)
            )
        if self.training and "dense_head" in self.train_only:
            stride = images.tensor.shape[-1] / feature.shape[-1]
            outputs["dense"] = (*self.train_only["dense_head"](memory), mask, stride)
        if extra is not None or denoising is not None:
            return outputs
        if self.mask_on:
            # masks from the last decoder layer only, as the official DETRsegm
            attention = self.bbox_attention(hs[-1], memory, mask)  # [N, Q, M, H, W]
            fpn = [features[f] for f in MASK_HEAD_IN_FEATURES]
            outputs["pred_masks"] = self.mask_head(projected, attention, fpn)
        if with_aux:
            outputs["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        return outputs

    def _denoising_inputs(self, targets: list[dict] | None):
        """(content, position [N, P*D, C], D) of the denoising queries in training, or None
        (none configured, no targets given, or no image of the batch has a target)."""
        if not (self.training and targets is not None and "denoising" in self.train_only):
            return None
        content, position, per_group = self.train_only["denoising"](targets)
        return None if per_group == 0 else (content, position, per_group)

    def _training_queries(self, extra: TrainingQueries | None, denoising):
        """Decoder inputs with the training-only query sets: queries ([T, C], or [N, T', C]
        with denoising queries), the self-attention mask that keeps the sets apart, and the
        decoder's content input (None: zeros)."""
        plain = self.query_embed.weight
        queries = extra.queries(plain) if extra is not None else plain  # [T, C]
        set_sizes = extra.set_sizes() if extra is not None else [len(plain)]
        content = None
        if denoising is not None:
            dn_content, dn_position, per_group = denoising
            n = dn_position.shape[0]
            queries = torch.cat([queries.expand(n, -1, -1), dn_position.to(queries)], 1)
            content = torch.cat(
                [torch.zeros_like(queries[:, : -dn_position.shape[1]]), dn_content], 1
            )
            set_sizes = set_sizes + [per_group] * self.train_only["denoising"].num_groups
        return queries, block_diagonal_mask(set_sizes, plain.device), content

    @staticmethod
    def _training_set_outputs(extra: TrainingQueries, logits, boxes) -> dict:
        """Outputs of the training-only query sets: the groups stacked group-major along the
        batch ([G*N, Q, ...], group 0 first) and, under ``one_to_many``, the one-to-many set."""
        split_logits, split_boxes = extra.split(logits), extra.split(boxes)
        outputs = _layer_outputs(split_logits["groups"], split_boxes["groups"])
        if split_logits["one_to_many"] is not None:
            outputs["one_to_many"] = _layer_outputs(
                split_logits["one_to_many"], split_boxes["one_to_many"]
            )
        return outputs

    # ---------------------------------------------------------------- entry points
    def forward(self, batched_inputs: list[dict]):
        """
        Args:
            batched_inputs: Detectron2 dicts with ``image`` (CHW, 0-255, ``INPUT.FORMAT``),
                in training ``instances`` (``gt_boxes`` xyxy pixels of ``image``,
                ``gt_classes``), optionally ``height``/``width`` for the output size.
        Returns:
            training: dict of weighted ``loss_*`` tensors; inference: see :meth:`inference`.
        """
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        targets = self.prepare_targets(batched_inputs, images.tensor.shape[-2:])
        outputs = self.forward_heads(images, targets=targets)
        # matching and losses in fp32 even when the trainer runs the network under autocast
        with torch.autocast(self.device.type, enabled=False):
            outputs = to_float32(outputs)
            if not self.train_only:
                return self.criterion(outputs, targets)
            return self._training_aid_losses(outputs, targets, images.image_sizes)

    def _training_aid_losses(self, outputs: dict, targets: list[dict], image_sizes) -> dict:
        """The set losses with the training-only query sets and the dense head's losses."""
        dense = outputs.pop("dense", None)
        one_to_many = outputs.pop("one_to_many", None)
        if one_to_many is not None:
            one_to_many = (one_to_many, self.one_to_many_repeat, self.one_to_many_weight)
        denoising = outputs.pop("denoising", None)
        if denoising is not None:
            dn_groups = self.train_only["denoising"].num_groups
            denoising = (denoising, dn_groups, self.denoising_weight)
        groups = self.train_only["queries"].num_groups if "queries" in self.train_only else 1
        losses = self.criterion(
            outputs, targets, num_groups=groups, one_to_many=one_to_many, denoising=denoising
        )
        if dense is not None:
            cls_logits, distances, padding, stride = dense
            dense_losses = self.train_only["dense_head"].losses(
                cls_logits, distances, padding, targets, image_sizes, stride
            )
            losses.update({k: v * self.dense_weight for k, v in dense_losses.items()})
        return losses

    def _test_heads(self, images: ImageList, with_aux: bool) -> dict:
        """``forward_heads`` in ``test_precision``, outputs in fp32 for post-processing."""
        with autocast(self.device.type, self.test_precision):
            outputs = self.forward_heads(images, with_aux=with_aux)
        return to_float32(outputs)

    def prepare_targets(
        self, batched_inputs: list[dict], padded_size: tuple[int, int] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Ground truth in the criterion's format: ``labels [G]`` and ``boxes [G, 4]`` cxcywh
        normalized by the unpadded image size; with ``mask_on`` also ``masks`` (uint8 [G, H, W])
        zero-padded to ``padded_size`` (default: the image's own size)."""
        targets = []
        for x in batched_inputs:
            instances = x["instances"].to(self.device)
            height, width = instances.image_size
            scale = torch.as_tensor(
                [width, height, width, height], dtype=torch.float32, device=self.device
            )
            boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor.float() / scale)
            target = {"labels": instances.gt_classes, "boxes": boxes}
            if self.mask_on:
                target["masks"] = self._gt_mask_tensor(instances, padded_size or (height, width))
            targets.append(target)
        return targets

    def _gt_mask_tensor(self, instances, padded_size: tuple[int, int]) -> torch.Tensor:
        """uint8 [G, H, W] masks of ``instances.gt_masks`` (bit masks or polygons), zero-padded
        at the bottom and right."""
        height, width = instances.image_size
        if not instances.has("gt_masks"):
            if len(instances):
                raise ValueError(
                    "MODEL.MASK_ON needs ground-truth masks: the dataset mapper gave instances "
                    "without gt_masks (use a dataset with segmentations, or set MODEL.MASK_ON "
                    "False)."
                )
            masks = torch.zeros((0, height, width), dtype=torch.uint8, device=self.device)
        elif isinstance(instances.gt_masks, PolygonMasks):
            masks = BitMasks.from_polygon_masks(instances.gt_masks, height, width).tensor
        else:
            masks = instances.gt_masks.tensor
        masks = masks.to(device=self.device, dtype=torch.uint8)
        pad_bottom, pad_right = padded_size[0] - masks.shape[-2], padded_size[1] - masks.shape[-1]
        return F.pad(masks, (0, pad_right, 0, pad_bottom))

    @torch.no_grad()
    def predict_raw(self, batched_inputs: list[dict]) -> dict:
        """The head's raw outputs for images in Detectron2's input format (eval mode only):
        ``pred_logits``, ``pred_boxes``, ``aux_outputs`` and, with ``mask_on``, ``pred_masks``
        as in :meth:`forward_heads`."""
        assert not self.training, "predict_raw() runs the model in eval mode; call model.eval()"
        return self._test_heads(self.preprocess_image(batched_inputs), with_aux=True)

    def inference(self, batched_inputs: list[dict], do_postprocess: bool = True):
        """
        Returns:
            with ``do_postprocess``: a list of dicts, one per input, at the ``height`` x
            ``width`` of each input (default: the image's own size), with the outputs switched
            on: ``instances`` (``Instances``: ``pred_boxes``, ``scores``, ``pred_classes``, with
            ``mask_on`` ``pred_masks`` bool [Q', H, W]; only thing classes), ``sem_seg``
            ([K, H, W] scores) and ``panoptic_seg`` (int32 [H, W] segment ids, segments_info).
            Without ``do_postprocess``: a list of ``Instances`` at the input image size.
        """
        assert not self.training, "inference() runs in eval mode"
        images = self.preprocess_image(batched_inputs)
        outputs = self._test_heads(images, with_aux=False)
        if not do_postprocess:
            return instances_results(
                outputs, self.postprocess_options, images.tensor.shape[-2:], images.image_sizes
            )
        sizes = [
            (x.get("height", h), x.get("width", w))
            for x, (h, w) in zip(batched_inputs, images.image_sizes)
        ]
        return inference_results(
            outputs, self.postprocess_options, images.tensor.shape[-2:], images.image_sizes, sizes
        )

    @property
    def postprocess_options(self) -> PostprocessOptions:
        """What :func:`inference_results` computes from the raw outputs (exported models store
        the same options in their JSON, so both run identical post-processing)."""
        return PostprocessOptions(
            num_classes=self.num_classes,
            mask_on=self.mask_on,
            instance_on=self.instance_on,
            semantic_on=self.semantic_on,
            panoptic_on=self.panoptic_on,
            thing_ids=self.thing_ids,
            panoptic_threshold=self.panoptic_threshold,
            mask_threshold=self.mask_threshold,
            score_activation=self.score_activation,
        )
