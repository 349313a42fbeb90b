"""DETR's optimizer: AdamW, lower backbone LR, gradient-norm clipping over the whole model."""

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params

from .compat import current_event_storage


def optimizer_param_groups(cfg: CfgNode, model: torch.nn.Module):
    """Parameter groups: ``SOLVER.BASE_LR`` everywhere, times ``SOLVER.BACKBONE_MULTIPLIER`` for
    the backbone; frozen parameters are left out. Weight decay ``SOLVER.WEIGHT_DECAY``, on norm
    layers ``SOLVER.WEIGHT_DECAY_NORM`` (the official recipe decays every parameter alike)."""
    return detr_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
    )


def detr_param_groups(
    model: torch.nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    backbone_multiplier: float,
) -> list[dict]:
    """:func:`optimizer_param_groups` from explicit values (LazyConfigs set ``model``)."""
    return get_default_optimizer_params(
        model,
        base_lr=base_lr,
        weight_decay=weight_decay,
        weight_decay_norm=weight_decay_norm,
        lr_factor_func=lambda name: backbone_multiplier if name.startswith("backbone.") else 1.0,
    )


def clipped_adamw(
    params: list[dict], *, lr: float, weight_decay: float, max_norm: float, norm_type: float = 2.0
) -> torch.optim.Optimizer:
    """The official optimizer: AdamW whose step first clips the whole model's gradient norm."""
    return _with_full_model_clipping(torch.optim.AdamW, max_norm, norm_type)(
        params, lr=lr, weight_decay=weight_decay
    )


def _with_full_model_clipping(
    optimizer_type: type[torch.optim.Optimizer], max_norm: float, norm_type: float
):
    """A subclass of ``optimizer_type`` whose ``step`` first clips the gradient norm of all its
    parameters together (``clip_grad_norm_`` over the model, as the official training loop),
    rather than Detectron2's per-parameter clipping."""

    class FullModelClipping(optimizer_type):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            storage = current_event_storage()
            if storage is not None:  # inside a training loop: make divergence visible
                storage.put_scalar("grad_norm", total_norm.item(), smoothing_hint=False)
            return super().step(closure=closure)

    FullModelClipping.__name__ = optimizer_type.__name__ + "WithFullModelGradientClip"
    return FullModelClipping


def build_detr_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` "ADAMW" (official) or "SGD", with ``SOLVER.CLIP_GRADIENTS``:
    ``CLIP_TYPE`` "full_model" clips the global gradient norm to ``CLIP_VALUE``;
    ``SOLVER.FUSED_OPTIMIZER`` uses PyTorch's fused implementation."""
    name = cfg.SOLVER.OPTIMIZER.upper()
    params = optimizer_param_groups(cfg, model)
    if name == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optimizer_type, kwargs = (
            torch.optim.SGD,
            {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV},
        )
    else:
        raise ValueError(
            f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {cfg.SOLVER.OPTIMIZER!r}."
        )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED:
        if clip.CLIP_TYPE != "full_model":
            raise ValueError(
                f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be 'full_model' for DETR, got {clip.CLIP_TYPE!r}."
            )
        optimizer_type = _with_full_model_clipping(optimizer_type, clip.CLIP_VALUE, clip.NORM_TYPE)
    if cfg.SOLVER.FUSED_OPTIMIZER:
        kwargs["fused"] = True
    return optimizer_type(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs
    )
