"""Upstream workarounds, each with its reason and the versions it covers; applied once when
``detr_d2`` is imported.

1. Official DETR ``.pth`` files pickle an ``argparse.Namespace`` under ``args``. Since PyTorch
   2.6, ``torch.load`` defaults to ``weights_only=True`` and refuses that class, so Detectron2's
   own checkpointer (fvcore ``Checkpointer._load_file``: ``torch.load`` without arguments) cannot
   read them. ``argparse.Namespace`` is a plain attribute container and runs no code: it is
   added to torch's safe globals (PyTorch >= 2.4 has ``add_safe_globals``).
2. fvcore's ``Checkpointer._load_model`` (fvcore 0.1.5, all Detectron2 releases) drops every
   checkpoint tensor whose shape differs from the model's *before* ``load_state_dict`` runs, so
   a model's ``_load_from_state_dict`` never sees the 92-row class head of an official file it
   could remap. ``DetectionCheckpointer._load_model`` is wrapped to let the model convert the
   state dict first when it offers ``convert_checkpoint_state_dict`` (models that do not are
   loaded exactly as before).
"""
import argparse
import functools
import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

__all__ = ["apply_upstream_workarounds"]

_MARK = "_detr_d2_converts_first"


def _allow_official_args_namespace() -> None:
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # older PyTorch: weights_only is not the default anyway
        add_safe_globals([argparse.Namespace])


def _let_models_convert_checkpoints() -> None:
    original = DetectionCheckpointer._load_model
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _load_model(self, checkpoint):
        model = getattr(self.model, "module", self.model)
        convert = getattr(model, "convert_checkpoint_state_dict", None)
        if convert is not None and isinstance(checkpoint.get("model"), dict):
            checkpoint["model"] = convert(checkpoint["model"])
        return original(self, checkpoint)

    setattr(_load_model, _MARK, True)
    DetectionCheckpointer._load_model = _load_model


def apply_upstream_workarounds() -> None:
    """Apply the workarounds of the module docstring (idempotent)."""
    _allow_official_args_namespace()
    _let_models_convert_checkpoints()
