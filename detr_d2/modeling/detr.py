"""DETR as a Detectron2 meta-architecture (Carion et al., "End-to-End Object Detection with
Transformers", 2020).

Shapes: N images, Q object queries, K classes (+1 "no object" logit), C hidden dim,
L decoder layers, H x W the transformer's input feature map, H4 x W4 the mask logits' grid (1/4
of the padded batch), T the queries of a training step (Q and the training aids').

With ``MODEL.MASK_ON`` the model is the official ``DETRsegm``: the same trunk plus a mask head
(:mod:`.segmentation`); inference can then return instance masks, semantic scores and panoptic
segmentations (``MODEL.DETR.TEST.{INSTANCE,SEMANTIC,PANOPTIC}_ON``).

Training-only aids (query groups, one-to-many and denoising queries, a dense head;
:mod:`.training_aids`) live under ``train_only``: each adds its queries and a loss branch, and
:meth:`Detr.loss_branches` hands every branch to the criterion.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

from ..checkpoint import is_official_detr_state_dict
from ..compat import let_detectron2_load_official_files
from ..finetune import CheckpointInit, fit_state_dict
from ..layout import ClassLayout, generic_layout, layout_from_cfg
from ..precision import autocast, precision_dtype, to_float32, use_channels_last
from .backbone import TRAIN_SIZE_DIVISIBILITY, padding_mask
from .box_ops import box_xyxy_to_cxcywh
from .consistency import check_aids, check_criterion, check_inputs
from .criterion import LossBranch, SetCriterion, build_criterion
from .feature_cache import FeatureCache
from .frozen_backbone import FoldedBackbone, has_foldable_frozen_part
from .position_encoding import build_position_encoding
from .postprocessing import (
    PostprocessOptions,
    inference_results,
    instances_results,
)
from .segmentation import MASK_HEAD_IN_FEATURES, build_mask_heads, gt_mask_tensor
from .training_aids import (
    DecoderQueries,
    TrainingAid,
    TrainingStep,
    aids_in,
    build_training_aids,
    init_learned_queries,
    train_only_modules,
)
from .transformer import Transformer, build_transformer, num_aux_layers

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


class _Trunk(NamedTuple):
    """Backbone and projection of a batch: ``features`` (every backbone output), the padding
    ``mask`` [N, H, W], position encoding ``pos`` and ``projected`` features [N, C, H, W]."""

    features: dict[str, torch.Tensor]
    mask: torch.Tensor
    pos: torch.Tensor
    projected: torch.Tensor


@META_ARCH_REGISTRY.register()
class Detr(nn.Module):
    """Backbone -> 1x1 projection -> transformer -> class and box heads, one set per query.

    Training returns the weighted set-prediction losses; inference returns, per image, an
    ``Instances`` with every query's box, score and class (see :meth:`inference`). With
    ``mask_on`` it also predicts one mask per query (``bbox_attention`` + ``mask_head``, official
    names) and can freeze everything else for the official second training stage.

    Constructor arguments:
        backbone, in_feature: a Detectron2 backbone and the output the transformer reads.
        position_embedding: maps a padding mask [N, H, W] to encodings [N, C, H, W].
        transformer: encoder-decoder of width C = ``transformer.d_model``.
        num_classes: K; the class head has K + 1 outputs, the last is "no object" (unused by
            the sigmoid class losses). ``criterion.num_classes`` must be K.
        num_queries: Q object queries.
        aux_loss: deep supervision (outputs and losses after every decoder layer) is the
            transformer's ``return_intermediate_dec``; None follows it, a bool must equal it.
        criterion: the set-prediction loss (training only); its ``weight_dict`` weights the
            L - 1 auxiliary layers the transformer supervises (:func:`~.criterion.build_weight_dict`).
        pixel_mean, pixel_std: per-channel normalization, in ``input_format`` order (0-255).
        input_format: "RGB" or "BGR" input images; the backbone always receives RGB, as the
            official (torchvision) weights expect.
        mask_on: add the mask head (needs the backbone outputs res2, res3, res4).
        freeze_detr: train only the mask head; everything else is frozen (official stage 2).
        instance_on, semantic_on, panoptic_on: inference returns ``instances`` (with
            ``pred_masks`` if ``mask_on``), ``sem_seg`` [K, H, W], ``panoptic_seg`` (both need
            ``mask_on``).
        thing_ids: the classes that are things (None: all). Instances are restricted to them,
            and panoptic segments of other classes are stuff.
        class_layout: names, thing flags and dataset ids of the K classes (default: numbered
            names); official checkpoints are remapped to it on load.
        panoptic_threshold: class probability a query needs to enter the panoptic output.
        mask_threshold: probability threshold of the binary instance masks.
        score_activation: how inference turns logits into scores: "softmax" (official), or
            "sigmoid" exactly when ``criterion.class_loss`` is "focal" or "ia_bce".
        test_precision: dtype of the network in inference (autocast; fp32 post-processing).
        channels_last: backbone weights and inputs in channels-last (NHWC) memory format.
        training_aids: training-only parts (:mod:`.training_aids`, box models only), kept
            under ``train_only``; inference runs without them.
        checkpoint_init: how a checkpoint of other classes or another query count starts the
            class head and queries (``MODEL.DETR.INIT``, :mod:`detr_d2.finetune`).
        feature_cache: training only, the frozen backbone stages' output of each view computed
            once (``MODEL.DETR.SPEED.FEATURE_CACHE``, :mod:`.feature_cache`), or None.
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
        score_activation: str = "softmax",
        # speed
        test_precision: torch.dtype = torch.float32,
        channels_last: bool = False,
        # training only
        training_aids: Sequence[TrainingAid] = (),
        checkpoint_init: CheckpointInit | None = None,
        feature_cache: FeatureCache | None = None,
    ):
        """See the class docstring for the arguments."""
        super().__init__()
        let_detectron2_load_official_files()  # official files through Detectron2's loaders
        mask_outputs = semantic_on or panoptic_on or freeze_detr
        check_inputs(backbone, in_feature, input_format, mask_on, mask_outputs, score_activation)
        check_criterion(transformer, criterion, num_classes, aux_loss, score_activation)
        check_aids(training_aids, num_classes, mask_on)
        self._build_trunk(backbone, in_feature, position_embedding, transformer, channels_last)
        self._build_heads(num_classes, num_queries, sigmoid=score_activation == "sigmoid")
        self.criterion = criterion
        self._set_normalization(pixel_mean, pixel_std, input_format)
        self.mask_on = mask_on
        if mask_on:
            self._build_mask_head(freeze_detr)
        self.instance_on, self.semantic_on, self.panoptic_on = instance_on, semantic_on, panoptic_on
        self.thing_ids = None if thing_ids is None else tuple(int(i) for i in thing_ids)
        self.class_layout = class_layout or generic_layout(num_classes)
        assert self.class_layout.num_classes == num_classes, "class_layout of other classes"
        self.panoptic_threshold, self.mask_threshold = panoptic_threshold, mask_threshold
        self.score_activation = score_activation
        self.test_precision = test_precision
        # parts that exist only for training; the inference model drops them (inference_graph)
        self.train_only = train_only_modules(training_aids)
        self.checkpoint_init = checkpoint_init or CheckpointInit()
        if feature_cache is not None:
            feature_cache.check_backbone(backbone)
        self.feature_cache = feature_cache  # no module: no checkpoint keys, no state to resume

    def _build_trunk(
        self,
        backbone: Backbone,
        in_feature: str,
        position_embedding: nn.Module,
        transformer: Transformer,
        channels_last: bool,
    ) -> None:
        self.backbone = backbone
        self.in_feature = in_feature
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # frozen backbone stages train as a copy with folded batch norms (not a submodule)
        self._folded_backbone = FoldedBackbone(channels_last)

    def _build_heads(self, num_classes: int, num_queries: int, sigmoid: bool) -> None:
        """The input projection, the object queries and the class and box heads."""
        hidden_dim = self.transformer.d_model
        channels = self.backbone.output_shape()[self.in_feature].channels
        self.input_proj = nn.Conv2d(channels, hidden_dim, 1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if sigmoid:
            # focal-loss prior (Lin et al. 2017): every class starts at probability 0.01
            nn.init.constant_(self.class_embed.bias, -math.log(99.0))
        self.num_classes = num_classes
        self.num_queries = num_queries

    def _set_normalization(self, pixel_mean, pixel_std, input_format: str) -> None:
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def aux_loss(self) -> bool:
        """Deep supervision: the transformer returns every decoder layer's output."""
        return bool(self.transformer.decoder.return_intermediate)

    def _build_mask_head(self, freeze_detr: bool) -> None:
        """``bbox_attention`` and ``mask_head`` (official names) on res2..res4 and the
        transformer's outputs; with ``freeze_detr`` only they train (official stage 2:
        ``--frozen_weights``), and batch norms become ``FrozenBatchNorm2d`` so that their
        statistics stay those of the stage-1 model (the official backbone freezes them anyway)."""
        self.bbox_attention, self.mask_head = build_mask_heads(
            self.backbone.output_shape(), self.transformer.d_model, self.transformer.nhead
        )
        if freeze_detr:
            self.backbone = FrozenBatchNorm2d.convert_frozen_batchnorm(self.backbone)
            for name, parameter in self.named_parameters():
                if not name.startswith(("bbox_attention.", "mask_head.")):
                    parameter.requires_grad_(False)

    def __setstate__(self, state):
        super().__setstate__(state)
        let_detectron2_load_official_files()  # an unpickled model loads as a built one

    @classmethod
    def from_config(cls, cfg) -> dict:
        detr = cfg.MODEL.DETR
        layout = layout_from_cfg(cfg)  # NUM_CLASSES 0: the dataset's count
        backbone = build_backbone(cfg)
        transformer = build_transformer(cfg)
        device_type = torch.device(cfg.MODEL.DEVICE).type
        # built in this order so that a seed gives the same initial weights as earlier versions
        # (precision_dtype's "auto" measurement draws from the global random generator too)
        return {
            "backbone": backbone,
            "in_feature": detr.IN_FEATURE,
            "transformer": transformer,
            "criterion": build_criterion(cfg, layout.num_classes, num_aux_layers(transformer)),
            "position_embedding": build_position_encoding(detr.POSITION_EMBEDDING, detr.HIDDEN_DIM),
            "test_precision": precision_dtype(cfg.TEST.PRECISION, "TEST.PRECISION", device_type),
            "training_aids": build_training_aids(cfg, layout.num_classes),
            "num_classes": layout.num_classes,
            "num_queries": detr.NUM_OBJECT_QUERIES,
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
            "score_activation": "softmax" if detr.LOSS.CLASS_LOSS == "softmax" else "sigmoid",
            "channels_last": use_channels_last(detr.SPEED.MEMORY_FORMAT, cfg.MODEL.DEVICE),
            "checkpoint_init": CheckpointInit.from_config(cfg, layout.num_classes),
            "feature_cache": FeatureCache.from_config(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def training_aids(self) -> list[TrainingAid]:
        """The training-only parts under ``train_only``, in the order they run."""
        return aids_in(self.train_only)

    def convert_checkpoint_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        class_layout: dict | None = None,
        **declared,
    ) -> dict:
        """``state_dict`` in this model's layout, checked to fit it
        (:func:`detr_d2.finetune.fit_state_dict`; ``declared``: what the file says it holds).
        Detectron2's checkpointers call this before their shape check (see
        :mod:`detr_d2.compat`)."""
        return fit_state_dict(self, state_dict, class_layout, **declared)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Old (official DETR) layouts are converted here too, for plain ``load_state_dict``;
        training-only queries the checkpoint lacks start from its object queries."""
        local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if is_official_detr_state_dict(local):
            converted = self.convert_checkpoint_state_dict(local)
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]
            state_dict.update({prefix + k: v for k, v in converted.items()})
        if init_learned_queries(self.training_aids, state_dict, prefix, self.query_embed.weight):
            logger.info(
                "Training-only query sets initialised from the checkpoint's object queries."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- shared trunk
    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalize, reorder to RGB and zero-pad at the bottom/right (inference: to the largest
        image, as the official batching; training: to a multiple of
        :data:`~.backbone.TRAIN_SIZE_DIVISIBILITY`); ``image_sizes`` keep the unpadded sizes."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        if self.input_format == "BGR":
            images = [x.flip(0) for x in images]
        divisibility = self.backbone.size_divisibility
        if self.training:
            divisibility = max(divisibility, TRAIN_SIZE_DIVISIBILITY)
        return ImageList.from_tensors(images, divisibility)

    padding_mask = staticmethod(padding_mask)

    def _trunk(self, images: ImageList) -> _Trunk:
        """Backbone features, padding mask, position encoding and projected features."""
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
        return _Trunk(features, mask, pos, self.input_proj(feature))

    def _heads(self, trunk: _Trunk, hs: torch.Tensor, memory: torch.Tensor, with_aux: bool):
        """Decoder outputs hs [L, N, T, C] -> the outputs dict of the plain queries (see
        :meth:`forward_heads`), and the class logits [L', N, T, K+1] and boxes [L', N, T, 4] of
        every query (L' = L with auxiliary outputs, else 1)."""
        with_aux = with_aux and self.aux_loss
        if not with_aux:
            hs = hs[-1:]
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        plain = slice(0, self.num_queries)
        outputs = {"pred_logits": logits[-1, :, plain], "pred_boxes": boxes[-1, :, plain]}
        if self.mask_on:
            # masks from the last decoder layer only, as the official DETRsegm
            attention = self.bbox_attention(hs[-1, :, plain], memory, trunk.mask)  # [N, Q, M, H, W]
            fpn = [trunk.features[f] for f in MASK_HEAD_IN_FEATURES]
            outputs["pred_masks"] = self.mask_head(trunk.projected, attention, fpn)
        if with_aux:
            outputs["aux_outputs"] = [
                {"pred_logits": a[:, plain], "pred_boxes": b[:, plain]}
                for a, b in zip(logits[:-1], boxes[:-1])
            ]
        return outputs, logits, boxes

    def forward_heads(self, images: ImageList, with_aux: bool = True) -> dict:
        """Raw head outputs: ``pred_logits [N, Q, K+1]``, ``pred_boxes [N, Q, 4]`` (sigmoid
        cxcywh relative to each unpadded image), with ``mask_on`` ``pred_masks [N, Q, H4, W4]``
        (mask logits on the padded batch's grid) and, with deep supervision and ``with_aux``,
        ``aux_outputs``: L-1 dicts with ``pred_logits`` and ``pred_boxes`` for the earlier
        decoder layers (inference skips them). The training aids take no part."""
        trunk = self._trunk(images)
        hs, memory = self.transformer(
            trunk.projected, trunk.mask, self.query_embed.weight, trunk.pos
        )
        return self._heads(trunk, hs, memory, with_aux)[0]

    def loss_branches(self, images: ImageList, targets: list[dict]) -> list[LossBranch]:
        """Training: the criterion's branches, the plain queries' first (:meth:`forward_heads`'
        outputs), then each training aid's, from one pass of the decoder over every query."""
        assert self.training, "loss_branches() runs in training mode; call model.train()"
        aids = self.training_aids
        trunk = self._trunk(images)
        queries = DecoderQueries.assemble(
            self.query_embed.weight, [aid.queries(targets) for aid in aids]
        )
        hs, memory = self.transformer(
            trunk.projected,
            trunk.mask,
            queries.position,
            trunk.pos,
            self_attn_mask=queries.attention_mask,
            query_content=queries.content,
        )
        outputs, logits, boxes = self._heads(trunk, hs, memory, with_aux=True)
        branches = [LossBranch("", outputs, targets)]
        if aids:
            stride = images.tensor.shape[-1] / trunk.projected.shape[-1]
            step = TrainingStep(
                logits, boxes, memory, trunk.mask, stride, images.image_sizes, targets
            )
            for aid, own in zip(aids, queries.spans):
                branches = aid.loss_branches(step, own, branches)
        return branches

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
        branches = self.loss_branches(images, targets)
        # matching and losses in fp32 even when the trainer runs the network under autocast
        with torch.autocast(self.device.type, enabled=False):
            return self.criterion.branch_losses([b.to_float32() for b in branches])

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
                target["masks"] = gt_mask_tensor(
                    instances, padded_size or (height, width), self.device
                )
            targets.append(target)
        return targets

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
        """What :func:`inference_results` computes from the raw outputs: the model's attributes
        of the same names (exported models store them in their JSON, so both run identical
        post-processing)."""
        return PostprocessOptions(
            **{f.name: getattr(self, f.name) for f in fields(PostprocessOptions)}
        )
