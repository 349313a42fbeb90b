"""Inference-only graph rewrites: batch norms folded into the convolutions before them, and
optionally ``torch.compile``.

In eval mode a (frozen) batch norm is a per-channel affine map, ``y = x * s + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``; folded into the convolution
(``W' = W * s``, ``b' = b * s + t``) it costs nothing and saves one pass over every activation
map of the backbone. The rewrite changes the parameters, so it is applied to a copy of the
model (:func:`inference_model`): the training model keeps its norms and its checkpoint layout.
"""

import copy
import logging

import torch
from detectron2.config import CfgNode
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

_FOLDABLE_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, frozen_only: bool = False) -> int:
    """Fold every batch norm that is a Detectron2 ``Conv2d``'s ``norm`` into that convolution, in
    place; returns how many were folded. Batch norms must use running statistics (eval mode).
    ``frozen_only``: only convolutions whose weight takes no gradient."""
    folded = 0
    for module in model.modules():
        if not isinstance(module, Conv2d) or not isinstance(module.norm, _FOLDABLE_NORMS):
            continue
        if frozen_only and module.weight.requires_grad:
            continue
        norm = module.norm
        if norm.training and isinstance(norm, nn.BatchNorm2d):
            raise RuntimeError("fold_batchnorm needs the model in eval mode (batch statistics).")
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        weight = module.weight * scale.reshape(-1, 1, 1, 1).to(module.weight)
        module.weight.copy_(weight)
        bias = shift if module.bias is None else module.bias * scale + shift
        module.bias = nn.Parameter(bias.to(module.weight), requires_grad=False)
        module.norm = None
        folded += 1
    return folded


def inference_model(model: nn.Module, cfg: CfgNode) -> nn.Module:
    """The model to run inference with: ``model`` itself, or an eval-mode copy with its batch
    norms folded into the convolutions (``TEST.FOLD_BATCHNORM``) and its backbone and transformer
    compiled by ``torch.compile`` (``TEST.COMPILE``). The copy has no training-only parts
    (``train_only``: extra query groups, one-to-many queries, dense head), so it is plain DETR.
    An exported graph (:class:`detr_d2.export.ExportedDetr`, not a module) is returned as it is."""
    if not isinstance(model, nn.Module) or not (cfg.TEST.FOLD_BATCHNORM or cfg.TEST.COMPILE):
        return model
    if isinstance(model, DistributedDataParallel):
        model = model.module
    model = copy.deepcopy(model).eval()
    if hasattr(model, "train_only"):
        model.train_only = nn.ModuleDict()
    if cfg.TEST.FOLD_BATCHNORM:
        folded = fold_batchnorm(model)
        logger.info(f"Inference model: {folded} batch norms folded into convolutions.")
    if cfg.TEST.COMPILE:
        # the first image of each new size pays for compilation (minutes on small CPUs)
        model.backbone = torch.compile(model.backbone)
        model.transformer = torch.compile(model.transformer)
        logger.info("Inference model: backbone and transformer compiled with torch.compile.")
    return model
