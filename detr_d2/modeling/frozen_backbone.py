"""The frozen stages of a backbone train as a copy with their batch norms folded into their
convolutions.

Why: fine-tuning on a CPU freezes most of the pretrained backbone (``MODEL.BACKBONE.FREEZE_AT``),
and then the frozen stages' forward pass is most of what is left of them: autograd records
nothing there, but every frozen batch norm is still one more pass over each feature map. Folded
into the convolutions (:func:`~.inference_graph.fold_batchnorm`, as the inference copy does), the
frozen R50 backbone's forward takes ~25 % less time (docs/finetuning.md). The copy shares the
trainable parameters (a trained res5 keeps learning through it) and is not a submodule:
checkpoint keys, the optimizer and DDP see the model as it is. It is rebuilt whenever the frozen
weights change (loading a checkpoint) or the model moves.
"""

import copy
import itertools

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from .inference_graph import fold_batchnorm


def has_foldable_frozen_part(backbone: nn.Module) -> bool:
    """Some frozen convolution with a frozen batch norm, and no batch norm anywhere that uses
    batch statistics (its running statistics would update in the copy, not in the model)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        return False
    return any(
        isinstance(m, Conv2d)
        and isinstance(m.norm, FrozenBatchNorm2d)
        and not m.weight.requires_grad
        for m in backbone.modules()
    )


def weights_key(backbone: nn.Module) -> tuple:
    """Changes when the backbone's frozen weights may have: a checkpoint load writes in place
    (new versions), ``.to()`` makes new tensors; trainable parameters change every step but are
    shared with any copy, so only their storage counts."""
    key = []
    for t in itertools.chain(backbone.parameters(), backbone.buffers()):
        key.append((t.data_ptr(), t.requires_grad, None if t.requires_grad else t._version))
    return tuple(key)


class FoldedBackbone:
    """Callable ``(backbone, pixels) -> features`` through a copy of ``backbone`` whose frozen
    convolutions have their batch norms folded in and whose trainable parameters are the
    backbone's own."""

    def __init__(self, channels_last: bool):
        self.channels_last = channels_last
        self._copy: nn.Module | None = None
        self._key: tuple | None = None

    def network(self, backbone: nn.Module) -> nn.Module:
        """The folded copy of ``backbone``'s current weights, in the backbone's mode."""
        key = weights_key(backbone)
        if key != self._key:
            shared = {id(p): p for p in backbone.parameters() if p.requires_grad}
            folded = copy.deepcopy(backbone, memo=shared)
            fold_batchnorm(folded, frozen_only=True)
            if self.channels_last:
                folded.to(memory_format=torch.channels_last)
            self._copy, self._key = folded, weights_key(backbone)
        self._copy.train(backbone.training)
        return self._copy

    def __call__(self, backbone: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.network(backbone)(pixels)
