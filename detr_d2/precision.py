"""Reduced precision: config names to dtypes, autocast scopes, and fp32 islands.

DETR runs its network under ``torch.autocast`` (bf16 on CPUs with AVX512-BF16/AMX and on
Ampere+ GPUs, fp16 on GPUs), while the Hungarian matching, the losses and the post-processing
stay in fp32: matching costs and GIoU of nearly equal boxes need fp32's resolution.
"""

import copy
import functools
import logging
import statistics
import time
from typing import Any

import torch
from detectron2.utils import comm

from .compat import cpu_has_amx, cpu_has_native_bf16

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_auto(name: str, key: str, device_type: str) -> str:
    """``name`` itself, or for "auto" the precision it picks on this device (see
    :func:`precision_dtype`), logged once."""
    if name != "auto":
        return name
    name = _auto_precision(device_type)
    logger.info(f"{key}='auto': {name} on this {device_type.upper()}.")
    return name


def precision_dtype(name: str, key: str, device_type: str) -> torch.dtype:
    """The dtype of precision ``name`` given in config ``key``, checked against the device.
    "auto" is the fastest precision with native support: on CPUs with AVX512-BF16/AMX, bf16
    where it measures faster than fp32 (:func:`cpu_bf16_speedup`), fp32 on other CPUs; bf16 on
    GPUs that have it, fp16 on older GPUs."""
    name = resolve_auto(name, key, device_type)
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


# bf16 must be this much faster than fp32 to be picked: on a near tie fp32 keeps its precision
# and the choice does not flip between runs of the same machine.
AUTO_BF16_MIN_SPEEDUP = 1.1


def _auto_precision(device_type: str) -> str:
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device_type != "cpu" or not _cpu_has_native_bf16():
        return "fp32"
    return _auto_cpu_precision()


@functools.cache
def _auto_cpu_precision() -> str:
    """bf16 or fp32 by :func:`cpu_bf16_speedup`, decided once per process. With several
    workers every one takes the first worker's measurement (one all-gather, at the first "auto"
    every worker resolves: building the trainer), so all of them train in the same precision."""
    speedup = cpu_bf16_speedup()
    if comm.get_world_size() > 1:
        speedup = comm.all_gather(speedup)[0]
    choice = "bf16" if speedup >= AUTO_BF16_MIN_SPEEDUP else "fp32"
    logger.info(
        f"bf16 convolutions and matrix products run {speedup:.2f}x the fp32 speed on this CPU: "
        f"'auto' is {choice} (bf16 from {AUTO_BF16_MIN_SPEEDUP}x)."
    )
    return choice


@functools.cache
def cpu_bf16_speedup(rounds: int = 9) -> float:
    """fp32 time / bf16 time of a training-like workload on this CPU, measured once per process
    (median of ``rounds`` back-to-back pairs, ~0.3 s): a 3x3 convolution (channels-last, batch
    8) and a linear layer, forward and backward, the kernels that take most of a DETR step.
    Native bf16 is not always the faster: the sample step is 1.5x faster in bf16 on an AMD EPYC
    with AVX512-BF16, but on an Intel Xeon with AVX512-BF16 and no AMX oneDNN's bf16 kernels ran
    1.4-1.9x slower than fp32 at every size tried, and this ratio is 0.6-0.7 there
    (docs/benchmarks.md). Leaves the global random state as it was: a seeded run draws the same
    weights whether or not it measured."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the modules' init leaves the global RNG as it was
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
        linear = torch.nn.Linear(256, 256)
    image = torch.randn(8, 64, 40, 40, generator=generator)
    tokens = torch.randn(2048, 256, generator=generator)

    def workload(dtype: torch.dtype):
        c = copy.deepcopy(conv).to(dtype=dtype, memory_format=torch.channels_last)
        lin = copy.deepcopy(linear).to(dtype)
        x = image.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        t = tokens.to(dtype).requires_grad_()

        def run():
            c(x).sum().backward()
            lin(t).sum().backward()

        return run

    runs = {dtype: workload(dtype) for dtype in (torch.float32, torch.bfloat16)}
    for run in runs.values():  # oneDNN creates its kernels on the first call
        run()
    ratios = []
    for _ in range(rounds):  # back to back in each round: a busy moment slows both
        seconds = {}
        for dtype, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[dtype] = time.perf_counter() - start
        ratios.append(seconds[torch.float32] / seconds[torch.bfloat16])
    return statistics.median(ratios)


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


# ---------------------------------------------------------------- hardware-chosen speed switches
def _explicit_choice(setting: str, key: str, on: str, off: str) -> bool | None:
    """``setting`` of the switch ``key`` ("auto", ``on`` or ``off``) as a bool; None for auto."""
    if setting not in ("auto", on, off):
        raise ValueError(f"{key} must be 'auto', '{on}' or '{off}', got {setting!r}.")
    return None if setting == "auto" else setting == on


def use_channels_last(setting: str, device: str | torch.device) -> bool:
    """``MODEL.DETR.SPEED.MEMORY_FORMAT``: "auto" is channels-last on CPUs (oneDNN's NHWC
    convolutions: the sample's fp32 training step 1.16x faster, the R50 one 1.135x,
    docs/benchmarks.md) and on GPUs with tensor cores (compute capability 7+, where cuDNN's
    tensor-core convolutions want NHWC), contiguous elsewhere."""
    key = "MODEL.DETR.SPEED.MEMORY_FORMAT"
    explicit = _explicit_choice(setting, key, "channels_last", "contiguous")
    if explicit is not None:
        return explicit
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(device)[0] >= 7
    return device.type == "cpu"


def attention_in_fp32(setting: str, device: str | torch.device) -> bool:
    """``MODEL.DETR.SPEED.ATTENTION_PRECISION``: whether the transformer's attention runs in fp32
    inside a bf16/fp16 autocast region. "auto": on CPUs without AMX, where PyTorch's bf16
    flash-attention kernel is 1.5-6x slower than its fp32 one at DETR's sizes; elsewhere the
    autocast dtype."""
    key = "MODEL.DETR.SPEED.ATTENTION_PRECISION"
    explicit = _explicit_choice(setting, key, "fp32", "autocast")
    if explicit is not None:
        return explicit
    return torch.device(device).type == "cpu" and not cpu_has_amx()
