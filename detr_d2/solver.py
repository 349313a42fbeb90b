"""DETR's optimizer: AdamW, lower backbone LR, gradient-norm clipping over the whole model."""

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params

from .compat import current_event_storage, fused_optimizer_device_types

# Parameter-name prefixes of the parts SOLVER.LR_FACTORS names.
MODEL_PARTS = {
    "BACKBONE": ("backbone.",),
    "ENCODER": ("input_proj.", "position_embedding.", "transformer.encoder."),
    "DECODER": ("transformer.decoder.",),
    "HEADS": ("class_embed.", "bbox_embed.", "query_embed.", "bbox_attention.", "mask_head."),
    "TRAINING_AIDS": ("train_only.",),
}


def model_part(name: str) -> str | None:
    """The part (a key of :data:`MODEL_PARTS`) that parameter ``name`` belongs to; ``None`` for
    parameters of no DETR part (other models), which keep factor 1."""
    for part, prefixes in MODEL_PARTS.items():
        if name.startswith(prefixes):
            return part
    return None


def lr_factors(cfg: CfgNode) -> dict[str, float]:
    """``SOLVER.LR_FACTORS`` per part, with ``BACKBONE`` -1 read as
    ``SOLVER.BACKBONE_MULTIPLIER``, checked: no negative factor, and no non-zero factor for a
    backbone that ``MODEL.BACKBONE.FREEZE_AT`` freezes whole (checked in
    :func:`freeze_zero_lr_parts`)."""
    factors = {part: float(cfg.SOLVER.LR_FACTORS[part]) for part in MODEL_PARTS}
    if factors["BACKBONE"] == -1.0:
        factors["BACKBONE"] = float(cfg.SOLVER.BACKBONE_MULTIPLIER)
    for part, factor in factors.items():
        if factor < 0:
            raise ValueError(f"SOLVER.LR_FACTORS.{part} must be >= 0 (0 freezes), got {factor}.")
    return factors


def freeze_zero_lr_parts(cfg: CfgNode, model: torch.nn.Module, factors: dict[str, float]) -> None:
    """Parts with factor 0 get ``requires_grad=False`` (no gradient, no optimizer state). A part
    frozen by other keys (``MODEL.BACKBONE.FREEZE_AT``) but given a non-zero factor is an error:
    the factor would silently do nothing."""
    params = dict(model.named_parameters())
    backbone = [p for n, p in params.items() if model_part(n) == "BACKBONE"]
    explicit = cfg.SOLVER.LR_FACTORS.BACKBONE != -1.0
    if (
        backbone
        and explicit
        and factors["BACKBONE"] > 0
        and not any(p.requires_grad for p in backbone)
    ):
        raise ValueError(
            f"MODEL.BACKBONE.FREEZE_AT {cfg.MODEL.BACKBONE.FREEZE_AT} freezes the whole backbone, "
            f"but SOLVER.LR_FACTORS.BACKBONE is {factors['BACKBONE']}: set it to 0 (or -1), or "
            "lower FREEZE_AT to train some stages."
        )
    for name, parameter in params.items():
        if factors.get(model_part(name), 1.0) == 0:
            parameter.requires_grad_(False)


def optimizer_param_groups(cfg: CfgNode, model: torch.nn.Module):
    """Parameter groups: ``SOLVER.BASE_LR`` times each part's ``SOLVER.LR_FACTORS`` (the
    backbone's default: ``SOLVER.BACKBONE_MULTIPLIER``); frozen parameters, and parts of factor
    0, are left out. Weight decay ``SOLVER.WEIGHT_DECAY``, on norm layers
    ``SOLVER.WEIGHT_DECAY_NORM`` (the official recipe decays every parameter alike)."""
    factors = lr_factors(cfg)
    freeze_zero_lr_parts(cfg, model, factors)
    return detr_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        backbone_multiplier=factors["BACKBONE"],
        part_factors=factors,
    )


def detr_param_groups(
    model: torch.nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    backbone_multiplier: float,
    part_factors: dict[str, float] | None = None,
) -> list[dict]:
    """:func:`optimizer_param_groups` from explicit values (LazyConfigs set ``model``);
    ``part_factors``: the LR factor of each part of :data:`MODEL_PARTS` (default: 1, the
    backbone ``backbone_multiplier``)."""
    factors = {part: 1.0 for part in MODEL_PARTS}
    factors.update(part_factors or {})
    factors["BACKBONE"] = backbone_multiplier
    return get_default_optimizer_params(
        model,
        base_lr=base_lr,
        weight_decay=weight_decay,
        weight_decay_norm=weight_decay_norm,
        lr_factor_func=lambda name: factors.get(model_part(name), 1.0),
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
    ``CLIP_TYPE`` "full_model" clips the global gradient norm to ``CLIP_VALUE``. The update is
    PyTorch's fused kernel (one kernel for every parameter instead of a loop of small ops: the
    same update up to float rounding, ~10 ms less per step of the CPU sample model) wherever
    PyTorch has one for the parameters' device."""
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
    if _fused_update_exists(optimizer_type, model):
        kwargs["fused"] = True
    return optimizer_type(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs
    )


def _fused_update_exists(optimizer_type: type, model: torch.nn.Module) -> bool:
    """Whether PyTorch has a fused ``optimizer_type`` for ``model``'s trained parameters (floating
    point, on one device type that PyTorch fuses for)."""
    params = [p for p in model.parameters() if p.requires_grad]
    devices = {p.device.type for p in params}
    if not params or len(devices) != 1 or not all(p.is_floating_point() for p in params):
        return False
    return devices.pop() in fused_optimizer_device_types()
