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

Helpers for private upstream details that other modules use (pinned: Detectron2 main of 2024 as
``sal-detectron2`` 0.7.2, fvcore 0.1.5, PyTorch 2.x; ``tests/test_compat.py`` fails when one of
the details below changes):

3. :func:`start_data_loader`: Detectron2's ``SimpleTrainer`` creates its data-loader iterator
   lazily (private property ``_data_loader_iter``, Detectron2 >= 2021). Resuming must create it
   *before* the checkpointed RNG state is restored, as an uninterrupted run did.
4. :func:`current_event_storage`: ``get_event_storage()`` asserts outside a training loop; the
   gradient-norm scalar of ``solver.py`` is written only inside one, so the private stack
   ``detectron2.utils.events._CURRENT_STORAGE_STACK`` is read instead (all Detectron2 releases).
5. :func:`cpu_has_native_bf16`: PyTorch has no public test for native bf16 on CPU; the private
   ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` (PyTorch >= 1.13) answers it.
6. :func:`eval_predictions_with`: ``COCOEvaluator._eval_predictions`` (Detectron2 >= 2022) picks
   its COCOeval class from its module globals ``COCOeval``/``COCOeval_opt``; a clone of the
   function with its own globals runs another backend (faster-coco-eval) without touching
   Detectron2's module. :func:`detectron2_takes_cocoeval_class` checks that bytecode detail.

Subclass overrides of private upstream methods stay beside the class that needs them, and are
covered by ``tests/test_compat.py`` as well: ``engine.DetrTrainer.__init__`` (a copy of
``DefaultTrainer.__init__``: DDP without ``device_ids`` for CPU models), ``engine._DetrAMPTrainer.
run_step`` (Detectron2's asserts CUDA and autocasts with ``torch.cuda.amp``), the
``_write_metrics`` override (``SimpleTrainer._write_metrics(loss_dict, data_time, prefix, iter)``)
and ``checkpoint.DetrCheckpointer``'s ``save`` / ``_load_model`` (fvcore 0.1.5 ``Checkpointer``) and
``_torch_load`` (Detectron2's ``DetectionCheckpointer``).
"""

import argparse
import functools
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import events

logger = logging.getLogger(__name__)

__all__ = [
    "allow_official_args_namespace",
    "apply_upstream_workarounds",
    "cpu_has_native_bf16",
    "current_event_storage",
    "detectron2_takes_cocoeval_class",
    "eval_predictions_with",
    "start_data_loader",
]

_MARK = "_detr_d2_converts_first"


def allow_official_args_namespace() -> None:
    """Item 1 (idempotent). Called again before each of our own loads: a ``with
    torch.serialization.safe_globals([...])`` block anywhere removes its classes on exit, even
    ones that were added for good before it."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is None:  # older PyTorch: weights_only is not the default anyway
        return
    if argparse.Namespace not in torch.serialization.get_safe_globals():
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
    allow_official_args_namespace()
    _let_models_convert_checkpoints()


def start_data_loader(trainer: Any) -> None:
    """Create a Detectron2 ``SimpleTrainer``'s data-loader iterator now (item 3 above)."""
    trainer._data_loader_iter  # noqa: B018  (the lazy property creates the iterator on first access)


def current_event_storage() -> events.EventStorage | None:
    """The innermost active ``EventStorage``, or None outside a training loop (item 4)."""
    stack = events._CURRENT_STORAGE_STACK
    return stack[-1] if stack else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has native bf16 (AVX512-BF16 / AMX) kernels in oneDNN (item 5)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # older or oneDNN-less builds: assume not
        return False


def detectron2_takes_cocoeval_class() -> bool:
    """Whether ``COCOEvaluator._eval_predictions`` reads its COCOeval class from module globals."""
    names = COCOEvaluator._eval_predictions.__code__.co_names
    return "COCOeval" in names and "COCOeval_opt" in names


@functools.cache
def eval_predictions_with(cocoeval: type) -> Callable:
    """Detectron2's ``COCOEvaluator._eval_predictions`` run as it is, except that its global names
    ``COCOeval`` and ``COCOeval_opt`` (the classes it passes to ``_evaluate_predictions_on_coco``)
    are ``cocoeval``: the function gets its own copy of the module globals, so Detectron2's module
    and every other evaluator keep pycocotools (item 6)."""
    method = COCOEvaluator._eval_predictions
    if not detectron2_takes_cocoeval_class():
        raise RuntimeError(
            "This Detectron2's COCOEvaluator._eval_predictions no longer picks its COCOeval class "
            "from the module names COCOeval/COCOeval_opt, so TEST.COCO_EVAL_BACKEND cannot be "
            "applied: set it 'pycocotools' and update detr_d2/compat.py."
        )
    function_globals = {**method.__globals__, "COCOeval": cocoeval, "COCOeval_opt": cocoeval}
    function = types.FunctionType(
        method.__code__, function_globals, method.__name__, method.__defaults__, method.__closure__
    )
    return functools.update_wrapper(function, method)
