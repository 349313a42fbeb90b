"""DETR as a Detectron2 meta-architecture (Carion et al., "End-to-End Object Detection with
Transformers", 2020).

Shapes: N images, Q object queries, K classes (+1 "no object" logit), C hidden dim,
L decoder layers, H x W the transformer's input feature map.
"""
import logging
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

from ..checkpoint import convert_official_state_dict, is_official_detr_state_dict
from .box_ops import box_xyxy_to_cxcywh
from .criterion import SetCriterion, build_weight_dict
from .matcher import HungarianMatcher
from .position_encoding import build_position_encoding
from .postprocessing import detection_inference
from .transformer import Transformer

logger = logging.getLogger(__name__)

__all__ = ["Detr", "MLP"]


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


@META_ARCH_REGISTRY.register()
class Detr(nn.Module):
    """Backbone -> 1x1 projection -> transformer -> class and box heads, one set per query.

    Training returns the weighted set-prediction losses; inference returns, per image, an
    ``Instances`` with every query's box, score and class (see :meth:`inference`).
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
        aux_loss: bool,
        criterion: SetCriterion,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        input_format: str = "RGB",
    ):
        """
        Args:
            backbone: a Detectron2 backbone; ``in_feature`` names the output the transformer uses.
            position_embedding: maps a padding mask [N, H, W] to encodings [N, C, H, W].
            transformer: encoder-decoder of width C = ``transformer.d_model``.
            num_classes: K; the class head has K + 1 outputs, the last is "no object".
            num_queries: Q object queries.
            aux_loss: also predict (and supervise) after every decoder layer.
            criterion: the set-prediction loss, used in training only.
            pixel_mean, pixel_std: per-channel normalization, in ``input_format`` order (0-255).
            input_format: "RGB" or "BGR" channel order of the input images; the backbone always
                receives RGB, as the official (torchvision) weights expect.
        """
        super().__init__()
        if in_feature not in backbone.output_shape():
            raise ValueError(
                f"MODEL.DETR.IN_FEATURE={in_feature!r} is not a backbone output; available: "
                f"{list(backbone.output_shape())}."
            )
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for DETR, got {input_format!r}.")
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
        self.aux_loss = aux_loss
        self.criterion = criterion
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        detr = cfg.MODEL.DETR
        backbone = build_backbone(cfg)
        matcher = HungarianMatcher(
            cost_class=detr.COST_CLASS, cost_bbox=detr.COST_BBOX, cost_giou=detr.COST_GIOU
        )
        base_weights = {
            "loss_ce": detr.CLASS_WEIGHT,
            "loss_bbox": detr.L1_WEIGHT,
            "loss_giou": detr.GIOU_WEIGHT,
        }
        num_aux = detr.DEC_LAYERS - 1 if detr.DEEP_SUPERVISION else 0
        criterion = SetCriterion(
            detr.NUM_CLASSES,
            matcher=matcher,
            weight_dict=build_weight_dict(base_weights, num_aux),
            eos_coef=detr.NO_OBJECT_WEIGHT,
            losses=("labels", "boxes"),
        )
        transformer = Transformer(
            d_model=detr.HIDDEN_DIM,
            nhead=detr.NHEADS,
            num_encoder_layers=detr.ENC_LAYERS,
            num_decoder_layers=detr.DEC_LAYERS,
            dim_feedforward=detr.DIM_FEEDFORWARD,
            dropout=detr.DROPOUT,
            normalize_before=detr.PRE_NORM,
            return_intermediate_dec=detr.DEEP_SUPERVISION,
        )
        return {
            "backbone": backbone,
            "in_feature": detr.IN_FEATURE,
            "position_embedding": build_position_encoding(detr.POSITION_EMBEDDING, detr.HIDDEN_DIM),
            "transformer": transformer,
            "num_classes": detr.NUM_CLASSES,
            "num_queries": detr.NUM_OBJECT_QUERIES,
            "aux_loss": detr.DEEP_SUPERVISION,
            "criterion": criterion,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "input_format": cfg.INPUT.FORMAT,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept an official DETR state dict (torchvision backbone names, optional ``detr.``
        prefix) in plain ``load_state_dict`` too; :class:`DetrCheckpointer` converts it first and
        also remaps the class head, which needs the dataset's category ids."""
        local = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if is_official_detr_state_dict(local):
            logger.warning("Loading an official DETR state dict: converting its keys on load.")
            converted, _ = convert_official_state_dict(local, self.num_classes)
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]
            state_dict.update({prefix + k: v for k, v in converted.items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- shared trunk
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize, reorder to RGB and zero-pad at the bottom/right (no size divisibility, as
        the official batching); ``image_sizes`` keep the unpadded sizes."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        if self.input_format == "BGR":
            images = [x.flip(0) for x in images]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    @staticmethod
    def padding_mask(images: ImageList, size: Tuple[int, int]) -> torch.Tensor:
        """bool [N, h, w], True on padding, for a feature map of ``size``.

        As the official implementation: built at input resolution from the unpadded sizes, then
        sampled with nearest interpolation to the feature map (a few padded rows can vanish).
        """
        tensor = images.tensor
        heights_widths = torch.as_tensor(images.image_sizes, device=tensor.device)  # [N, 2]
        ys = torch.arange(tensor.shape[-2], device=tensor.device)
        xs = torch.arange(tensor.shape[-1], device=tensor.device)
        mask = (ys[None, :, None] >= heights_widths[:, 0, None, None]) | (
            xs[None, None, :] >= heights_widths[:, 1, None, None]
        )  # [N, H, W]
        return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]

    def forward_heads(self, images: ImageList) -> Dict:
        """Raw head outputs: ``pred_logits [N, Q, K+1]``, ``pred_boxes [N, Q, 4]`` (sigmoid
        cxcywh relative to each unpadded image) and, with deep supervision, ``aux_outputs``:
        L-1 dicts with the same two keys for the earlier decoder layers."""
        feature = self.backbone(images.tensor)[self.in_feature]
        mask = self.padding_mask(images, feature.shape[-2:])
        pos = self.position_embedding(mask).to(feature.dtype)
        hs, _ = self.transformer(self.input_proj(feature), mask, self.query_embed.weight, pos)
        logits = self.class_embed(hs)  # [L, N, Q, K+1]
        boxes = self.bbox_embed(hs).sigmoid()  # [L, N, Q, 4]
        outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            outputs["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
            ]
        return outputs

    # ---------------------------------------------------------------- entry points
    def forward(self, batched_inputs: List[Dict]):
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
        outputs = self.forward_heads(images)
        return self.criterion(outputs, self.prepare_targets(batched_inputs))

    def prepare_targets(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        """Ground truth in the criterion's format: ``labels [G]`` and ``boxes [G, 4]`` cxcywh
        normalized by the unpadded image size."""
        targets = []
        for x in batched_inputs:
            instances = x["instances"].to(self.device)
            height, width = instances.image_size
            scale = torch.as_tensor([width, height, width, height], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor.float() / scale)
            targets.append({"labels": instances.gt_classes, "boxes": boxes})
        return targets

    @torch.no_grad()
    def predict_raw(self, batched_inputs: List[Dict]) -> Dict:
        """The head's raw outputs for images in Detectron2's input format (eval mode only):
        ``pred_logits``, ``pred_boxes`` and ``aux_outputs`` as in :meth:`forward_heads`."""
        assert not self.training, "predict_raw() runs the model in eval mode; call model.eval()"
        return self.forward_heads(self.preprocess_image(batched_inputs))

    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        """
        Returns:
            with ``do_postprocess``: a list of ``{"instances": Instances}`` with boxes in the
            ``height`` x ``width`` of each input (default: the image's own size); otherwise a list
            of ``Instances`` at the input image size.
        """
        assert not self.training, "inference() runs in eval mode"
        images = self.preprocess_image(batched_inputs)
        outputs = self.forward_heads(images)
        if not do_postprocess:
            return detection_inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        sizes = [
            (x.get("height", h), x.get("width", w)) for x, (h, w) in zip(batched_inputs, images.image_sizes)
        ]
        results = detection_inference(outputs["pred_logits"], outputs["pred_boxes"], sizes)
        return [{"instances": r} for r in results]
