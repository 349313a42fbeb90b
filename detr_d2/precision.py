"""Reduced precision: config names to dtypes, autocast scopes, and fp32 islands.

DETR runs its network under ``torch.autocast`` (bf16 on CPUs with AVX512-BF16/AMX and on
Ampere+ GPUs, fp16 on GPUs), while the Hungarian matching, the losses and the post-processing
stay in fp32: matching costs and GIoU of nearly equal boxes need fp32's resolution.
"""

import logging
from typing import Any

import torch

from .compat import cpu_has_native_bf16

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(name: str, key: str, device_type: str) -> torch.dtype:
    """The dtype of precision ``name`` given in config ``key``, checked against the device.
    "auto" is the fastest precision with native support: bf16 on CPUs with AVX512-BF16/AMX
    (fp32 on others), bf16 on GPUs that have it, fp16 on older GPUs."""
    if name == "auto":
        name = _auto_precision(device_type)
        logger.info(f"{key}='auto': {name} on this {device_type.upper()}.")
    if name not in PRECISIONS:
        raise ValueError(f"{key} must be 'auto' or one of {list(PRECISIONS)}, got {name!r}.")
    if name == "fp16" and device_type == "cpu":
        raise ValueError(
            f"{key}='fp16' needs a GPU: CPUs have no fast fp16 arithmetic. Use 'bf16' on CPU."
        )
    if name == "bf16" and device_type == "cpu" and not _cpu_has_native_bf16():
        logger.warning(
            f"{key}='bf16' on a CPU without native bf16 (AVX512-BF16 or AMX): it is emulated "
            "and may be slower than 'fp32'."
        )
    return PRECISIONS[name]


def _auto_precision(device_type: str) -> str:
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device_type == "cpu" and _cpu_has_native_bf16() else "fp32"


def _cpu_has_native_bf16() -> bool:
    return cpu_has_native_bf16()  # a module-level name, so tests can pretend either CPU


def autocast(device_type: str, dtype: torch.dtype):
    """``torch.autocast`` to ``dtype``; a no-op scope for fp32."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def to_float32(value: Any) -> Any:
    """``value`` (tensors, and dicts/lists/tuples of them) with floating tensors in fp32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value
