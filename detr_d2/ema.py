"""Exponential moving average (EMA) of the model weights, evaluated and saved instead of the raw
training weights (``SOLVER.EMA``).

The EMA averages out the noise of the last few hundred steps, which matters most in short
schedules where the learning rate never decays far. Every checkpoint the trainer writes holds the
EMA weights as ``model``, so whichever way a checkpoint is loaded (``DefaultPredictor``,
``DetectionCheckpointer``, a plain config) it gives the EMA model's outputs; the raw training
weights travel in the trainer state (``trainer.hooks.EMAHook``) and come back on ``--resume``.
"""

import copy
import logging

import torch
from detectron2.engine import HookBase
from torch import nn

logger = logging.getLogger(__name__)


class WeightEMA:
    """EMA of every floating-point entry of a model's state dict (parameters and batch-norm
    statistics); integer entries (``num_batches_tracked``) are copied.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average
    does not remember the random initialisation for thousands of steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY must be in (0, 1), got {decay}.")
        self.decay = decay
        self.updates = 0
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in model.state_dict().items():
            average = self.weights[key]
            if average.is_floating_point():
                average.mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for key, value in weights.items():
            if key in self.weights:
                self.weights[key].copy_(value)

    def averaged_model(self, model: nn.Module) -> nn.Module:
        """An eval-mode copy of ``model`` with the averaged weights."""
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(self.weights)
        return averaged.eval()


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class EMAHook(HookBase):
    """Updates the EMA after every step and makes the trainer's checkpointer save it as
    ``model``; its own state (saved in the trainer checkpoint) is the raw training weights and
    the update count, restored on resume after the checkpointer loaded the EMA weights."""

    def __init__(self, model: nn.Module, checkpointer, decay: float):
        self.model = unwrap(model)
        self.ema = WeightEMA(self.model, decay)
        checkpointer.saved_model_state = self.ema.state_dict

    def before_train(self):
        if self.ema.updates == 0:  # start from the loaded weights (MODEL.WEIGHTS), not the init
            self.ema.load_weights(self.model.state_dict())

    def after_step(self):
        self.ema.update(self.model)

    def state_dict(self) -> dict:
        return {"train_weights": self.model.state_dict(), "updates": self.ema.updates}

    def load_state_dict(self, state: dict) -> None:
        # The checkpointer has just loaded the file's "model", i.e. the EMA weights.
        self.ema.load_weights(self.model.state_dict())
        self.ema.updates = state["updates"]
        self.model.load_state_dict(state["train_weights"])
        logger.info(
            f"Resumed the weight EMA ({self.ema.updates} updates) and the training weights."
        )
