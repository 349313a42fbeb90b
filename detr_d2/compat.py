"""Upstream workarounds and every use of a private Detectron2, fvcore or PyTorch detail, each
with its reason and the versions it covers; ``tests/test_compat.py`` has a test for each that
fails, naming it, when the upstream detail changes. Pinned (``d2/requirements.txt``): Detectron2
main of 2024 as ``sal-detectron2`` 0.7.2, fvcore 0.1.5.post20221221, PyTorch 2.14.

Detectron2 is otherwise reached through public extension points: ``DetrTrainer`` builds its parts
from ``DefaultTrainer``'s public ``build_*`` methods (item 7), the CPU/GPU mixed-precision step is
our own ``SimpleTrainer`` subclass (item 8), the COCO evaluation backend a ``COCOEvaluator``
subclass (item 6), and the checkpointer a ``DetectionCheckpointer`` subclass (items 10, 11).

The one class-level change (items 1 and 2), made by :func:`let_detectron2_load_official_files`
when the first ``Detr`` is built (or unpickled), so that official DETR files load through Detectron2's *own*
``DetectionCheckpointer`` and ``DefaultPredictor``, which no subclass of ours reaches:

1. Official DETR ``.pth`` files pickle an ``argparse.Namespace`` under ``args``. Since PyTorch
   2.6, ``torch.load`` defaults to ``weights_only=True`` and refuses that class, so Detectron2's
   checkpointer (``DetectionCheckpointer._torch_load``: ``torch.load`` without ``weights_only``)
   cannot read them. ``argparse.Namespace``, a plain attribute container that runs no code, and
   nothing else, is added to torch's safe globals (PyTorch >= 2.4 has ``add_safe_globals``).
2. fvcore's ``Checkpointer._load_model`` (fvcore 0.1.5, all Detectron2 releases) drops every
   checkpoint tensor whose shape differs from the model's *before* ``load_state_dict`` runs, so
   a model's ``_load_from_state_dict`` never sees the 92-row class head of an official file it
   could remap. ``DetectionCheckpointer._load_model`` is wrapped to let the model convert the
   state dict first (:func:`let_model_convert`) when it offers
   ``convert_checkpoint_state_dict``, which only ``detr_d2``'s ``Detr`` does: every other model
   loads exactly as before.

   Why on the first build of ``Detr`` and not at import: importing ``detr_d2`` only registers
   the model (``detr_d2/__init__.py``), and a process that never builds our model keeps
   Detectron2 exactly as it is. Every checkpoint load into a ``Detr`` comes after its
   construction (``Detr.__init__``) or unpickling (``Detr.__setstate__``), which both apply it.

Helpers for private upstream details that other modules use:

3. :func:`start_data_loader`: Detectron2's ``SimpleTrainer`` creates its data-loader iterator
   lazily (private property ``_data_loader_iter``, Detectron2 >= 2021). Resuming must create it
   *before* the checkpointed RNG state is restored, as an uninterrupted run did. The
   mixed-precision step (item 8) draws its batches from it, as ``SimpleTrainer.run_step`` does.
4. :func:`current_event_storage`: ``get_event_storage()`` asserts outside a training loop; the
   gradient-norm scalar of ``solver.py`` is written only inside one. Detectron2 0.7.2 has the
   public ``has_event_storage()``, so this no longer reads the private storage stack.
5. :func:`cpu_has_native_bf16`: PyTorch has no public test for native bf16 on CPU; the private
   ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` (PyTorch >= 1.13) answers it.
   :func:`cpu_has_amx` likewise reads the private ``torch.cpu._is_amx_tile_supported``
   (PyTorch >= 2.3) for ``MODEL.DETR.SPEED.ATTENTION_PRECISION "auto"``, and
   :func:`fused_optimizer_device_types` the private
   ``torch.optim.optimizer._get_fused_kernels_supported_devices`` (PyTorch >= 2.4) for the
   fused optimizer update of ``solver.py``.
6. ``evaluation.BackendCOCOEvaluator`` overrides ``COCOEvaluator._eval_predictions(predictions,
   img_ids)`` (the method Mask2Former's ``InstanceSegEvaluator`` overrides too) to compute AP
   with another COCOeval class (faster-coco-eval): its own code for the same steps, which passes
   the class as the ``cocoeval_fn`` argument of Detectron2's module function
   ``_evaluate_predictions_on_coco`` (Detectron2 >= 2022) and reads the evaluator's
   ``_coco_api``, ``_metadata``, ``_output_dir``, ``_do_evaluation``, ``_tasks``,
   ``_max_dets_per_image``, ``_tasks_from_predictions`` and ``_derive_coco_results``. With pycocotools, Detectron2's method
   runs itself. :func:`detectron2_takes_cocoeval_fn` checks the argument.

What the trainer and checkpointer of ``engine.py`` and ``checkpoint.py`` need from upstream:

7. ``engine.DetrTrainer.__init__`` builds, in ``DefaultTrainer.__init__``'s order, from public
   parts (``TrainerBase.__init__``, the ``build_*`` class methods, ``create_ddp_model`` with
   ``device_ids=None`` for CPU models, which DDP refuses otherwise, our step trainer and
   checkpointer, ``build_hooks``), and does not call ``DefaultTrainer.__init__``, which builds
   Detectron2's own step trainer and checkpointer from module names with no method to override.
   ``DefaultTrainer``'s other methods rely on the attributes its ``__init__`` sets
   (``_trainer``, ``scheduler``, ``checkpointer``, ``start_iter``, ``max_iter``, ``cfg``):
   ours sets the same ones.
8. ``engine._DetrAMPTrainer`` is a ``SimpleTrainer`` with its own ``run_step`` on
   ``torch.autocast`` (PyTorch's mixed-precision recipe), because Detectron2's
   ``AMPTrainer.run_step`` (0.7.2) asserts CUDA and autocasts with ``torch.cuda.amp``. It keeps
   its gradient scaler's state under ``"grad_scaler"``, as ``AMPTrainer.state_dict`` does.
9. :class:`NonFiniteLossCheck` overrides the private ``SimpleTrainer._write_metrics(loss_dict,
   data_time, prefix, iter)``, the one hook both step trainers' ``run_step`` call with the loss
   dict before the optimizer step (Detectron2 >= 2021), to stop there naming the non-finite
   terms.
10. :class:`AtomicWrites`: fvcore 0.1.5's ``Checkpointer.save`` and ``tag_last_checkpoint`` write
    through ``self.path_manager.open(path, "wb" / "w")``; a checkpointer whose path manager is
    wrapped by this class writes every file atomically (temporary name, fsync, rename), so a run
    killed at any moment keeps its previous good checkpoint. ``save`` merges its ``**kwargs``
    into the file last, so ``DetrCheckpointer`` saves e.g. the weight EMA as ``model=...``.
11. ``checkpoint.DetrCheckpointer._torch_load`` overrides Detectron2's private
    ``DetectionCheckpointer._torch_load(f)``, which its ``_load_file`` calls for ``.pth`` files:
    our loads pass ``weights_only=True`` explicitly (so also with a PyTorch older than 2.6) and
    refuse unsafe files with advice. ``DetrCheckpointer._load_model`` extends fvcore's
    ``_load_model(checkpoint)`` (item 2) by dropping mismatched heads with one log line each.
"""

import argparse
import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Iterator
from typing import IO, Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.evaluation import coco_evaluation
from detectron2.utils import events

logger = logging.getLogger(__name__)

__all__ = [
    "AtomicWrites",
    "NonFiniteLossCheck",
    "allow_official_args_namespace",
    "atomic_open",
    "cpu_has_native_bf16",
    "current_event_storage",
    "detectron2_takes_cocoeval_fn",
    "let_detectron2_load_official_files",
    "let_model_convert",
    "start_data_loader",
]

_MARK = "_detr_d2_converts_first"
_CONVERTED = "_detr_d2_converted"  # set in a loaded checkpoint dict once it is converted


def allow_official_args_namespace() -> None:
    """Item 1 (idempotent). Called again before each of our own loads: a ``with
    torch.serialization.safe_globals([...])`` block anywhere removes its classes on exit, even
    ones that were added for good before it."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is None:  # older PyTorch: weights_only is not the default anyway
        return
    if argparse.Namespace not in torch.serialization.get_safe_globals():
        add_safe_globals([argparse.Namespace])


def let_model_convert(checkpointer: Any, checkpoint: dict) -> None:
    """Item 2: replace ``checkpoint["model"]`` by the checkpointer's model's own conversion of it,
    when the model offers ``convert_checkpoint_state_dict`` (a no-op for its own layout)."""
    model = getattr(checkpointer.model, "module", checkpointer.model)
    convert = getattr(model, "convert_checkpoint_state_dict", None)
    if convert is None or not isinstance(checkpoint.get("model"), dict):
        return
    if checkpoint.get(_CONVERTED):  # our checkpointer converts before the upstream method
        return
    # a detr_d2 checkpoint's class names (for seeding the model's classes from them), and what
    # the file says it holds: official training args, a detr_d2 architecture, heuristic names
    names = {
        "class_layout": "class_layout",
        "args": "official_args",
        "architecture": "architecture",
        "matching_heuristics": "matching_heuristics",
    }
    extra = {arg: checkpoint[key] for key, arg in names.items() if checkpoint.get(key)}
    checkpoint["model"] = convert(checkpoint["model"], **extra)
    checkpoint[_CONVERTED] = True


def _let_models_convert_checkpoints() -> None:
    original = DetectionCheckpointer._load_model
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _load_model(self, checkpoint):
        let_model_convert(self, checkpoint)
        return original(self, checkpoint)

    setattr(_load_model, _MARK, True)
    DetectionCheckpointer._load_model = _load_model


def let_detectron2_load_official_files() -> None:
    """Items 1 and 2 (idempotent): the class-level change of the module docstring."""
    allow_official_args_namespace()
    _let_models_convert_checkpoints()


def start_data_loader(trainer: Any) -> None:
    """Create a Detectron2 ``SimpleTrainer``'s data-loader iterator now (item 3 above)."""
    trainer._data_loader_iter  # noqa: B018  (the lazy property creates the iterator on first access)


def current_event_storage() -> events.EventStorage | None:
    """The innermost active ``EventStorage``, or None outside a training loop (item 4)."""
    return events.get_event_storage() if events.has_event_storage() else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has native bf16 (AVX512-BF16 / AMX) kernels in oneDNN (item 5)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # older or oneDNN-less builds: assume not
        return False


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, on which PyTorch's bf16 attention kernels are fast."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # builds without the check: assume not
        return False


def fused_optimizer_device_types() -> list[str]:
    """The device types PyTorch's optimizers have fused kernels for (CUDA only before 2.4)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return ["cuda"]
    return list(_get_fused_kernels_supported_devices())


def detectron2_takes_cocoeval_fn() -> bool:
    """Whether Detectron2's ``_evaluate_predictions_on_coco`` takes the COCOeval class to use as
    its ``cocoeval_fn`` argument (item 6)."""
    evaluate = getattr(coco_evaluation, "_evaluate_predictions_on_coco", None)
    return evaluate is not None and "cocoeval_fn" in inspect.signature(evaluate).parameters


# ---------------------------------------------------------------- trainer (items 7-9)
class NonFiniteLossCheck:
    """Item 9: mixin for Detectron2's ``SimpleTrainer`` and its subclasses: stop on a non-finite
    loss before the optimizer step, naming the loss terms and the iteration, on every rank
    (Detectron2 reports the total only, on the main process)."""

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        bad = sorted(k for k, v in loss_dict.items() if not torch.isfinite(v).all())
        if bad:
            iteration = self.iter if iter is None else iter
            values = ", ".join(f"{k}={loss_dict[k].item()}" for k in bad)
            raise FloatingPointError(
                f"Non-finite loss at iteration {iteration}: {values}. Training stopped before the "
                "optimizer step; the checkpoints in OUTPUT_DIR are intact. Lower SOLVER.BASE_LR "
                "or check the data, then continue with --resume."
            )
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


# ---------------------------------------------------------------- checkpointer (items 10, 11)
@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """``open(path, mode)`` for writing, atomically: the block writes a temporary file beside
    ``path``, which is flushed to disk and renamed to ``path`` when the block ends normally, and
    removed when it raises (``path`` then keeps its previous content)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class AtomicWrites:
    """Item 10: a checkpointer's path manager whose ``open`` for writing (modes ``"w"``,
    ``"wb"``) of a local file is :func:`atomic_open`, meant for ``with`` blocks as fvcore uses it;
    reads, other modes, other path schemes and every other method are the wrapped manager's."""

    def __init__(self, path_manager: Any):
        self.path_manager = path_manager

    def open(self, path: str, mode: str = "r", **kwargs):
        if mode in ("w", "wb") and "://" not in path and not kwargs:
            return atomic_open(path, mode)
        return self.path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name: str):
        if name == "path_manager":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.path_manager, name)
