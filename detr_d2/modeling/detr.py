"""DETR as a Detectron2 meta-architecture (Carion et al., "End-to-End Object Detection with
Transformers", 2020).

Shapes: N images, Q object queries, K classes (+1 "no object" logit), C hidden dim,
L decoder layers, H x W the transformer's input feature map, H4 x W4 the mask logits' grid (1/4
of the padded batch), T the queries of a training step (Q and the training aids').

With ``MODEL.MASK_ON`` the model is the official ``DETRsegm``: the same trunk plus a mask head
(:mod:`.segmentation`) for instance masks, semantic scores and panoptic segmentations. Training
only, the aids of :mod:`.training_aids` (query groups, one-to-many and denoising queries, a dense
head) add their queries and loss branches; inference runs without them.
"""

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

from ..compat import let_detectron2_load_official_files
from ..finetune import CheckpointInit, convert_official_in_place, fit_state_dict
from ..layout import ClassLayout, generic_layout, layout_from_cfg
from ..precision import autocast, precision_dtype, to_float32, use_channels_last
from .backbone import TRAIN_SIZE_DIVISIBILITY, padding_mask
from .consistency import check_aids, check_criterion, check_inputs, check_postprocess
from .criterion import LossBranch, SetCriterion, build_criterion, criterion_targets
from .feature_cache import FeatureCache
from .frozen_backbone import FoldedBackbone, has_foldable_frozen_part
from .heads import MLP
from .position_encoding import build_position_encoding
from .postprocessing import PostprocessOptions, inference_results, instances_results
from .segmentation import MASK_HEAD_IN_FEATURES, build_mask_heads, freeze_all_but_mask_heads
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

    Training returns the weighted losses of ``criterion`` over :meth:`loss_branches`; inference
    returns Detectron2's output dicts (:meth:`inference`). With ``mask_on`` it also predicts one
    mask per query (``bbox_attention`` + ``mask_head``, official names, on res2..res4).

    Arguments that need a word (the parts are documented in their modules, and the constructor
    checks that they agree, :mod:`.consistency`):
        num_classes: K; the class head has K + 1 outputs, the last is "no object".
        input_format: "RGB" or "BGR" images (0-255), the order of ``pixel_mean``/``pixel_std``;
            the backbone always receives RGB, as the official (torchvision) weights expect.
        postprocess: what inference returns (default: instances with softmax scores), for the
            model's K and ``mask_on``; "sigmoid" scores exactly when ``criterion.class_loss`` is
            "focal" or "ia_bce".
        class_layout: the K classes' names, thing flags and dataset ids (default: numbered);
            official checkpoints are remapped to it on load.
        test_precision: dtype of the network in inference (autocast; fp32 post-processing).
        aux_loss: deep supervision is the transformer's ``return_intermediate_dec``; None
            follows it, a bool must equal it.
        freeze_detr: train only the mask head (official stage 2).
        training_aids, checkpoint_init, feature_cache: training only (:mod:`.training_aids`
            under ``train_only``, :mod:`detr_d2.finetune`, :mod:`.feature_cache`).
    """

    @configurable
    def __init__(
        self,
        *,
        # network
        backbone: Backbone,
        in_feature: str,
        position_embedding: nn.Module,
        transformer: Transformer,
        num_classes: int,
        num_queries: int,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        input_format: str = "RGB",
        mask_on: bool = False,
        channels_last: bool = False,
        # inference
        postprocess: PostprocessOptions | None = None,
        class_layout: ClassLayout | None = None,
        test_precision: torch.dtype = torch.float32,
        # training only
        criterion: SetCriterion,
        aux_loss: bool | None = None,
        freeze_detr: bool = False,
        training_aids: Sequence[TrainingAid] = (),
        checkpoint_init: CheckpointInit | None = None,
        feature_cache: FeatureCache | None = None,
    ):
        """See the class docstring for the arguments."""
        super().__init__()
        let_detectron2_load_official_files()  # official files through Detectron2's loaders
        postprocess = postprocess or PostprocessOptions(num_classes, mask_on)
        check_inputs(backbone, in_feature, input_format, mask_on, freeze_detr, postprocess)
        check_criterion(transformer, criterion, num_classes, aux_loss, postprocess.score_activation)
        check_postprocess(postprocess, num_classes, mask_on)
        check_aids(training_aids, num_classes, mask_on)
        self._build_trunk(backbone, in_feature, position_embedding, transformer, channels_last)
        self._build_heads(num_classes, num_queries, postprocess.score_activation == "sigmoid")
        self.criterion = criterion
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.mask_on = mask_on
        if mask_on:
            self._build_mask_head(freeze_detr)
        self.postprocess = postprocess
        self.class_layout = class_layout or generic_layout(num_classes)
        assert self.class_layout.num_classes == num_classes, "class_layout of other classes"
        self.test_precision = test_precision
        # parts that exist only for training; the inference model drops them (inference_graph)
        self.train_only = train_only_modules(training_aids)
        self.checkpoint_init = checkpoint_init or CheckpointInit()
        if feature_cache is not None:
            feature_cache.check_backbone(backbone)
        self.feature_cache = feature_cache  # no module: no checkpoint keys, no state to resume

    def _build_trunk(self, backbone, in_feature, position_embedding, transformer, channels_last):
        self.backbone, self.in_feature = backbone, in_feature
        self.position_embedding, self.transformer = position_embedding, transformer
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

    def _build_mask_head(self, freeze_detr: bool) -> None:
        """``bbox_attention`` and ``mask_head`` (official names) on res2..res4 and the
        transformer's outputs; with ``freeze_detr`` only they train (official stage 2)."""
        self.bbox_attention, self.mask_head = build_mask_heads(
            self.backbone.output_shape(), self.transformer.d_model, self.transformer.nhead
        )
        if freeze_detr:
            freeze_all_but_mask_heads(self)

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
            "postprocess": PostprocessOptions.from_config(cfg, layout),
            "class_layout": layout,
            "channels_last": use_channels_last(detr.SPEED.MEMORY_FORMAT, cfg.MODEL.DEVICE),
            "checkpoint_init": CheckpointInit.from_config(cfg, layout.num_classes),
            "feature_cache": FeatureCache.from_config(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def aux_loss(self) -> bool:
        """Deep supervision: the transformer returns every decoder layer's output."""
        return bool(self.transformer.decoder.return_intermediate)

    @property
    def training_aids(self) -> list[TrainingAid]:
        """The training-only parts under ``train_only``, in the order they run."""
        return aids_in(self.train_only)

    # ---------------------------------------------------------------- checkpoints
    def convert_checkpoint_state_dict(
        self, state_dict: dict[str, torch.Tensor], class_layout: dict | None = None, **declared
    ) -> dict:
        """``state_dict`` in this model's layout, checked to fit it (``declared``: what the file
        says it holds); Detectron2's checkpointers call it before their shape check
        (:func:`detr_d2.finetune.fit_state_dict`, :mod:`detr_d2.compat`)."""
        return fit_state_dict(self, state_dict, class_layout, **declared)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Old (official DETR) layouts are converted here too, for plain ``load_state_dict``;
        training-only queries the checkpoint lacks start from its object queries."""
        convert_official_in_place(self, state_dict, prefix)
        init_learned_queries(self.training_aids, state_dict, prefix, self.query_embed.weight)
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
        aids, trunk = self.training_aids, self._trunk(images)
        queries = DecoderQueries.assemble(
            self.query_embed.weight, [a.queries(targets) for a in aids]
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

    def prepare_targets(
        self, batched_inputs: list[dict], padded_size: tuple[int, int] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Ground truth in the criterion's format (:func:`~.criterion.criterion_targets`), masks
        with ``mask_on``."""
        return criterion_targets(batched_inputs, self.device, self.mask_on, padded_size)

    def _test_heads(self, images: ImageList, with_aux: bool) -> dict:
        """``forward_heads`` in ``test_precision``, outputs in fp32 for post-processing."""
        with autocast(self.device.type, self.test_precision):
            outputs = self.forward_heads(images, with_aux=with_aux)
        return to_float32(outputs)

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
        outputs, padded_size = self._test_heads(images, with_aux=False), images.tensor.shape[-2:]
        if not do_postprocess:
            return instances_results(outputs, self.postprocess, padded_size, images.image_sizes)
        sizes = [
            (x.get("height", h), x.get("width", w))
            for x, (h, w) in zip(batched_inputs, images.image_sizes)
        ]
        return inference_results(outputs, self.postprocess, padded_size, images.image_sizes, sizes)
