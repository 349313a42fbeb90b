"""Upstream workarounds and every use of a private Detectron2, fvcore or PyTorch detail, each
with its reason and the versions it covers; ``tests/test_compat.py`` has a test for each that
fails, naming it, when the upstream detail changes. Pinned (``d2/requirements.txt``): Detectron2
main of 2024 as ``sal-detectron2`` 0.7.2, fvcore 0.1.5.post20221221, PyTorch 2.14.

Applied once when ``detr_d2`` is imported:

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
   loaded exactly as before); :func:`let_model_convert` is that step.

Helpers for private upstream details that other modules use:

3. :func:`start_data_loader`: Detectron2's ``SimpleTrainer`` creates its data-loader iterator
   lazily (private property ``_data_loader_iter``, Detectron2 >= 2021). Resuming must create it
   *before* the checkpointed RNG state is restored, as an uninterrupted run did.
4. :func:`current_event_storage`: ``get_event_storage()`` asserts outside a training loop; the
   gradient-norm scalar of ``solver.py`` is written only inside one. Detectron2 0.7.2 has the
   public ``has_event_storage()``, so this no longer reads the private storage stack.
5. :func:`cpu_has_native_bf16`: PyTorch has no public test for native bf16 on CPU; the private
   ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` (PyTorch >= 1.13) answers it.
6. :func:`eval_predictions_with`: ``COCOEvaluator._eval_predictions`` (Detectron2 >= 2022) picks
   its COCOeval class from its module globals ``COCOeval``/``COCOeval_opt``; a clone of the
   function with its own globals runs another backend (faster-coco-eval) without touching
   Detectron2's module. :func:`detectron2_takes_cocoeval_class` checks that bytecode detail.

What the trainer and checkpointer of ``engine.py`` and ``checkpoint.py`` need from upstream:

7. :func:`init_default_trainer`: ``DefaultTrainer.__init__`` (Detectron2 0.7.2) builds its step
   trainer (``AMPTrainer``/``SimpleTrainer``), DDP model (``create_ddp_model``, which passes
   ``device_ids=[local rank]``, refused by DDP for CPU models) and checkpointer
   (``DetectionCheckpointer``) from module names, with no method to override. It runs unchanged
   with those names, and ``setup_logger``, meaning ours (the same technique as item 6); logging
   is set up by the entry points (``default_setup``), as before, when this was a copy.
8. :func:`amp_run_step`: ``AMPTrainer.run_step`` (Detectron2 0.7.2) asserts CUDA and autocasts
   with ``torch.cuda.amp``, so CPU bf16 training needs this copy of it on ``torch.autocast``,
   without the options ``DetrTrainer`` does not use (asserted).
9. :class:`NonFiniteLossCheck` overrides the private ``SimpleTrainer._write_metrics(loss_dict,
   data_time, prefix, iter)``, the one hook both trainers' ``run_step`` call with the loss dict
   before the optimizer step (Detectron2 >= 2021), to stop there naming the non-finite terms.
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
import logging
import os
import time
import types
from collections.abc import Callable, Iterator
from typing import IO, Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import events

logger = logging.getLogger(__name__)

__all__ = [
    "AtomicWrites",
    "NonFiniteLossCheck",
    "allow_official_args_namespace",
    "amp_run_step",
    "apply_upstream_workarounds",
    "atomic_open",
    "cpu_has_native_bf16",
    "create_ddp_model_any_device",
    "current_event_storage",
    "detectron2_takes_cocoeval_class",
    "eval_predictions_with",
    "init_default_trainer",
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


def apply_upstream_workarounds() -> None:
    """Apply the workarounds of the module docstring (idempotent)."""
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


def detectron2_takes_cocoeval_class() -> bool:
    """Whether ``COCOEvaluator._eval_predictions`` reads its COCOeval class from module globals."""
    names = COCOEvaluator._eval_predictions.__code__.co_names
    return "COCOeval" in names and "COCOeval_opt" in names


def _with_globals(function: Callable, names: dict[str, Any]) -> Callable:
    """``function`` as it is, except that its module-level ``names`` mean other objects: a new
    function on the same code with its own copy of the globals, so the upstream module and every
    other user of it are untouched. Fails when ``function`` no longer uses one of ``names``."""
    unused = sorted(set(names) - set(function.__code__.co_names))
    if unused:
        raise RuntimeError(
            f"{function.__module__}.{function.__qualname__} no longer uses {unused}: this "
            "upstream version needs an update of detr_d2/compat.py."
        )
    clone = types.FunctionType(
        function.__code__,
        {**function.__globals__, **names},
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    clone.__kwdefaults__ = function.__kwdefaults__
    return functools.update_wrapper(clone, function)


@functools.cache
def eval_predictions_with(cocoeval: type) -> Callable:
    """Detectron2's ``COCOEvaluator._eval_predictions`` run as it is, except that its global names
    ``COCOeval`` and ``COCOeval_opt`` (the classes it passes to ``_evaluate_predictions_on_coco``)
    are ``cocoeval``: the function gets its own copy of the module globals, so Detectron2's module
    and every other evaluator keep pycocotools (item 6)."""
    if not detectron2_takes_cocoeval_class():
        raise RuntimeError(
            "This Detectron2's COCOEvaluator._eval_predictions no longer picks its COCOeval class "
            "from the module names COCOeval/COCOeval_opt, so TEST.COCO_EVAL_BACKEND cannot be "
            "applied: set it 'pycocotools' and update detr_d2/compat.py."
        )
    names = {"COCOeval": cocoeval, "COCOeval_opt": cocoeval}
    return _with_globals(COCOEvaluator._eval_predictions, names)


# ---------------------------------------------------------------- trainer (items 7-9)
def create_ddp_model_any_device(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model``, without ``device_ids`` for a CPU model (DDP refuses
    them; Detectron2 passes the local rank), so several CPU processes train with gloo."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return create_ddp_model(model, **kwargs)


# What DefaultTrainer.__init__ builds from module names, and what it builds with them instead.
DEFAULT_TRAINER_INIT_NAMES = (
    "create_ddp_model",
    "AMPTrainer",
    "SimpleTrainer",
    "DetectionCheckpointer",
    "setup_logger",
)


def init_default_trainer(
    trainer: DefaultTrainer, cfg: Any, *, step_trainer: Callable, checkpointer: type
) -> None:
    """Item 7: ``DefaultTrainer.__init__(trainer, cfg)`` as it is (the build order, the
    ``build_*`` methods, the hooks), except that it builds

    - the step trainer as ``step_trainer(model, data_loader, optimizer)``, with or without
      ``SOLVER.AMP.ENABLED``;
    - the DDP model with :func:`create_ddp_model_any_device`;
    - the checkpointer as ``checkpointer(model, cfg.OUTPUT_DIR, trainer=...)``;

    and leaves the logging set-up to the entry point (no ``setup_logger()``)."""
    names = dict.fromkeys(DEFAULT_TRAINER_INIT_NAMES[1:3], step_trainer)
    names.update(
        create_ddp_model=create_ddp_model_any_device,
        DetectionCheckpointer=checkpointer,
        setup_logger=lambda *args, **kwargs: None,
    )
    _with_globals(DefaultTrainer.__init__, names)(trainer, cfg)


def amp_run_step(trainer: AMPTrainer, device_type: str) -> None:
    """Item 8: one step of Detectron2's ``AMPTrainer.run_step`` on any device: the forward under
    ``torch.autocast(device_type, trainer.precision)``, backward and optimizer step through the
    trainer's gradient scaler (unscaled before the optimizer's full-model clipping, since
    ``GradScaler.step`` unscales first)."""
    assert trainer.model.training, "[_DetrAMPTrainer] model was changed to eval mode!"
    assert not (
        trainer.zero_grad_before_forward or trainer.async_write_metrics or trainer.log_grad_scaler
    ), "amp_run_step has no zero_grad_before_forward, async_write_metrics or log_grad_scaler"
    start = time.perf_counter()
    data = next(trainer._data_loader_iter)
    data_time = time.perf_counter() - start
    with torch.autocast(device_type, dtype=trainer.precision):
        loss_dict = trainer.model(data)  # the criterion inside runs in fp32
    losses = sum(loss_dict.values())
    trainer.optimizer.zero_grad()
    trainer.grad_scaler.scale(losses).backward()
    trainer.after_backward()
    trainer._write_metrics(loss_dict, data_time)
    trainer.grad_scaler.step(trainer.optimizer)
    trainer.grad_scaler.update()


class NonFiniteLossCheck:
    """Item 9: mixin for Detectron2's Simple/AMP trainers: stop on a non-finite loss before the
    optimizer step, naming the loss terms and the iteration, on every rank (Detectron2 reports
    the total only, on the main process)."""

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
