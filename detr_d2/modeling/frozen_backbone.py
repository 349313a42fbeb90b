"""A frozen backbone in training runs as a copy with its batch norms folded into its convolutions.

Why: fine-tuning on a CPU freezes the pretrained backbone (``MODEL.BACKBONE.FREEZE_AT``), and
then its forward pass is most of what is left of it: autograd records nothing there, but every
frozen batch norm is still one more pass over each feature map. Folded into the convolutions
(:func:`~.inference_graph.fold_batchnorm`, as the inference copy does), the R50 backbone's
forward takes ~25 % less time (docs/finetuning.md). The copy is not a submodule: checkpoint
keys, the optimizer and DDP see the model as it is; it is rebuilt whenever the backbone's
weights change (loading a checkpoint) or move.
"""

import copy
import itertools

import torch
from torch import nn

from .inference_graph import fold_batchnorm


def is_frozen(backbone: nn.Module) -> bool:
    """No trainable parameter and no batch norm that uses batch statistics."""
    if any(p.requires_grad for p in backbone.parameters()):
        return False
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())


class FoldedBackbone:
    """Callable ``(backbone, pixels) -> features`` through a folded copy of ``backbone``."""

    def __init__(self, channels_last: bool):
        self.channels_last = channels_last
        self._copy: nn.Module | None = None
        self._key: tuple | None = None

    @staticmethod
    def _weights_key(backbone: nn.Module) -> tuple:
        # a checkpoint load writes in place (new versions); .to() makes new tensors
        tensors = list(itertools.chain(backbone.parameters(), backbone.buffers()))
        return tuple((t.data_ptr(), t._version) for t in tensors)

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        key = self._weights_key(backbone)
        if key != self._key:
            folded = copy.deepcopy(backbone).eval()
            fold_batchnorm(folded)
            if self.channels_last:
                folded.to(memory_format=torch.channels_last)
            self._copy, self._key = folded, key
        return self._copy(pixels)
