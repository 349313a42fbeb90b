"""A compact report of a DETR model's size and cost, logged once at training start.

Parameters are counted per part of the architecture (paper Sec. 3.2: backbone, 1x1 projection,
encoder, decoder, object queries, prediction heads), split into trainable and frozen, and FLOPs
are measured with fvcore for one image at the test size, so runs and papers can be compared.
"""

import logging
import warnings
from collections.abc import Sequence

import torch
from detectron2.config import CfgNode
from detectron2.structures import ImageList
from detectron2.utils import comm
from torch import nn

from .data.augmentation import DetrResizeShortestEdge

logger = logging.getLogger(__name__)

__all__ = [
    "model_report",
    "log_model_report",
    "parameter_counts",
    "count_flops",
    "flops_image_size",
]

# (row label, parameter-name prefixes); the first matching row takes a parameter
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("backbone", ("backbone.",)),
    ("input_proj", ("input_proj.",)),
    ("transformer encoder", ("transformer.encoder.",)),
    ("transformer decoder", ("transformer.decoder.",)),
    ("query embeddings", ("query_embed.",)),
    ("class head", ("class_embed.",)),
    ("box head", ("bbox_embed.",)),
    # the official segmentation model's names (DETRsegm): attention map + FPN-style conv head
    ("mask head", ("bbox_attention.", "mask_head.")),
)
OTHER = "other"


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def _part_of(name: str) -> str:
    for label, prefixes in PARTS:
        if name.startswith(prefixes):
            return label
    return OTHER


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{part: {"total", "trainable", "frozen"}}`` for every part in :data:`PARTS` (and "other"),
    plus ``"total"``; frozen = ``requires_grad`` False (e.g. the stem and res2 for FREEZE_AT=2)."""
    labels = [label for label, _ in PARTS] + [OTHER, "total"]
    counts = {label: {"total": 0, "trainable": 0, "frozen": 0} for label in labels}
    for name, parameter in _unwrap(model).named_parameters():
        kind = "trainable" if parameter.requires_grad else "frozen"
        for label in (_part_of(name), "total"):
            counts[label]["total"] += parameter.numel()
            counts[label][kind] += parameter.numel()
    return counts


def flops_image_size(cfg: CfgNode) -> tuple[int, int]:
    """(H, W) of a 4:3 landscape image after the test resize, e.g. 800x1066 for the official
    config (shorter side INPUT.MIN_SIZE_TEST, longer side capped at INPUT.MAX_SIZE_TEST)."""
    short = int(cfg.INPUT.MIN_SIZE_TEST)
    if short <= 0:
        raise ValueError(f"INPUT.MIN_SIZE_TEST must be positive for a test size, got {short}")
    return DetrResizeShortestEdge.get_output_shape(
        3 * short, 4 * short, short, cfg.INPUT.MAX_SIZE_TEST
    )


def _sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore has no rule for fused attention (the path nn.MultiheadAttention takes without
    weights): count its two batched matmuls, q @ k^T and weights @ v, as multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])  # [..., L, E], [..., S, E], [..., S, Ev]
    batch = 1
    for size in q[:-2]:
        batch *= size
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


class _RawForward(nn.Module):
    """Image tensor in, head tensors out: what ``torch.jit.trace`` (and so fvcore) needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = self.model.preprocess_image([{"image": image}])
        # while tracing, ImageList holds sizes as tensors; the padding mask wants Python ints
        sizes = [(int(h), int(w)) for h, w in images.image_sizes]
        with torch.no_grad():
            outputs = self.model.forward_heads(ImageList(images.tensor, sizes))
        # every head output, so that tracing keeps the ops of each (pred_masks with a mask head)
        return tuple(v for k, v in sorted(outputs.items()) if isinstance(v, torch.Tensor))


def count_flops(
    model: nn.Module, image_size: tuple[int, int]
) -> tuple[int, dict[str, int], list[str]]:
    """FLOPs (fvcore's convention: one multiply-add = one FLOP) of one inference forward.

    Returns:
        total, per-part FLOPs (the :data:`PARTS` labels that have any, and "other"), and the
        names of operators fvcore does not count (norms, softmax, elementwise ops).
    """
    from fvcore.nn import FlopCountAnalysis

    model = _unwrap(model)
    was_training = model.training
    model.eval()
    image = torch.full((3, *image_size), 128.0, device=model.device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python values in the graph
            analysis = FlopCountAnalysis(_RawForward(model), (image,))
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(
                False
            ).tracer_warnings("none")
            total = analysis.total()
            by_module = analysis.by_module()
            unsupported = sorted(op.replace("aten::", "") for op in analysis.unsupported_ops())
    finally:
        model.train(was_training)
    parts: dict[str, int] = {}
    for label, prefixes in PARTS:
        flops = sum(by_module.get("model." + p.rstrip("."), 0) for p in prefixes)
        if flops:
            parts[label] = flops
    parts[OTHER] = total - sum(parts.values())
    return total, parts, unsupported


def _millions(value: int) -> str:
    return f"{value / 1e6:.2f}M"


def model_report(model: nn.Module, cfg: CfgNode, flops: bool = True) -> str:
    """Parameters per part (trainable / frozen) and FLOPs per part for one test-size image.

    FLOP counting traces the model once in eval mode (then restores its mode); when it fails, the
    report says why instead of raising, so a report never stops training.
    """
    counts = parameter_counts(model)
    part_flops: dict[str, int] | None = None
    flop_line = "FLOPs: not measured"
    if flops:
        try:
            size = flops_image_size(cfg)
            total_flops, part_flops, unsupported = count_flops(model, size)
            flop_line = (
                f"FLOPs for one {size[0]}x{size[1]} image (fvcore, 1 multiply-add = 1 FLOP): "
                f"{total_flops / 1e9:.2f} G; ops not counted: "
                + (", ".join(unsupported[:6]) + (", ..." if len(unsupported) > 6 else "") or "none")
            )
        # Tracing an arbitrary model can fail in many ways (unsupported Python, devices, shapes);
        # the numbers are informative only, so any failure becomes a line of the report.
        except Exception as e:
            part_flops = None
            reason = str(e).splitlines()[0] if str(e) else ""
            flop_line = f"FLOPs: unavailable ({type(e).__name__}: {reason})"
    rows: Sequence[str] = [label for label, _ in PARTS] + [OTHER, "total"]
    header = f"{'part':<22}{'parameters':>14}{'trainable':>14}{'frozen':>14}{'GFLOPs':>11}"
    lines = [f"Model report: {type(_unwrap(model)).__name__}", header, "-" * len(header)]
    for label in rows:
        count = counts[label]
        if label in ("mask head", OTHER) and count["total"] == 0:
            if round((part_flops or {}).get(label, 0) / 1e9, 3) == 0:
                continue  # parts this model does not have
        if part_flops is None:
            gflops = "-"
        elif label == "total":
            gflops = f"{sum(part_flops.values()) / 1e9:.3f}"
        else:
            gflops = f"{part_flops.get(label, 0) / 1e9:.3f}"
        lines.append(
            f"{label:<22}{count['total']:>14,}{count['trainable']:>14,}{count['frozen']:>14,}{gflops:>11}"
        )
    total = counts["total"]
    lines.append(
        f"{_millions(total['total'])} parameters: {_millions(total['trainable'])} trainable, "
        f"{_millions(total['frozen'])} frozen"
    )
    lines.append(flop_line)
    return "\n".join(lines)


def log_model_report(model: nn.Module, cfg: CfgNode) -> None:
    """Log :func:`model_report` once (main process only: every rank holds the same model)."""
    if comm.is_main_process():
        logger.info("\n" + model_report(model, cfg))
