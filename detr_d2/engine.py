"""Detectron2 ``DefaultTrainer`` for DETR: its optimizer, mapper, evaluator and checkpointer."""

import logging
import os
import time
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter

from .checkpoint import DetrCheckpointer
from .compat import NonFiniteLossCheck, start_data_loader
from .data import DetrDatasetMapper, drop_degenerate_boxes
from .data.categories import check_labels_fit
from .data.resumable import (
    ResumableTrainingSampler,
    SeededMapDataset,
    aspect_ratio_groups,
    rng_state,
    set_rng_state,
)
from .ema import EMAHook, unwrap
from .evaluation import EVALUATORS, coco_evaluators, cocoeval_class
from .layout import layout_from_cfg, set_layout_keys
from .model_report import log_model_report
from .modeling.feature_cache import check_feature_cache
from .modeling.inference_graph import inference_model
from .precision import precision_dtype, resolve_auto
from .solver import build_detr_optimizer
from .training_log import CompactMetricPrinter

logger = logging.getLogger(__name__)


def resolve_device(cfg: CfgNode) -> None:
    """Fall back to the CPU (with a log line) when ``MODEL.DEVICE`` asks for CUDA but none is
    available, so configs written for GPUs run on laptops and CI machines as they are."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available: running on CPU."
        )
        cfg.MODEL.DEVICE = "cpu"
        # fp16 has no fast CPU kernels; bf16 has fp32's range, so no loss scaling is lost
        if cfg.TEST.PRECISION == "fp16":
            logger.warning("TEST.PRECISION='fp16' needs a GPU: using 'bf16' on CPU.")
            cfg.TEST.PRECISION = "bf16"
        if cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.PRECISION == "fp16":
            logger.warning("SOLVER.AMP.PRECISION='fp16' needs a GPU: using 'bf16' on CPU.")
            cfg.SOLVER.AMP.PRECISION = "bf16"
    logger.info(f"Running on {cfg.MODEL.DEVICE} with {torch.get_num_threads()} CPU threads.")


def recorded_config(output_dir: str) -> CfgNode | None:
    """The config a run in ``output_dir`` recorded (``config.yaml``), if it left a checkpoint to
    resume from; ``None`` otherwise."""
    path = os.path.join(output_dir, "config.yaml")
    if not (output_dir and os.path.isfile(path)):
        return None
    if not os.path.isfile(os.path.join(output_dir, "last_checkpoint")):
        return None
    with open(path) as f:
        return CfgNode.load_cfg(f)


def resolve_auto_precision(cfg: CfgNode, recorded: CfgNode | None = None) -> None:
    """Replace "auto" in ``SOLVER.AMP.PRECISION`` and ``TEST.PRECISION`` by the precision it
    picks, so that ``config.yaml`` records it. A resumed run passes the config its first start
    recorded (:func:`recorded_config`) and keeps that choice, so its steps compute as the
    interrupted run's did whatever a new speed measurement (the CPU "auto") would say."""
    device_type = "cuda" if cfg.MODEL.DEVICE.startswith("cuda") else "cpu"
    for node_of, key in (
        (lambda c: c.SOLVER.AMP, "SOLVER.AMP.PRECISION"),
        (lambda c: c.TEST, "TEST.PRECISION"),
    ):
        node = node_of(cfg)
        if node.PRECISION != "auto":
            continue
        before = node_of(recorded).get("PRECISION", "auto") if recorded is not None else "auto"
        if before != "auto":
            logger.info(f"{key}='auto': {before}, as the run being resumed chose.")
            node.PRECISION = before
        else:
            node.PRECISION = resolve_auto("auto", key, device_type)


def resolve_num_workers(cfg: CfgNode) -> int:
    """``DATALOADER.NUM_WORKERS``, or for -1 a count by device and cores. One DETR mapper
    worker maps ~400 small (192 px) or ~75 COCO-size (640x480) training images per second,
    several times what a CPU training step consumes, so CPU training gets one worker and keeps
    its cores for the model; a GPU process gets up to 4, leaving a core to the main process."""
    if cfg.DATALOADER.NUM_WORKERS >= 0:
        return cfg.DATALOADER.NUM_WORKERS
    if torch.device(cfg.MODEL.DEVICE).type == "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) // max(1, comm.get_local_size())
    return max(1, min(4, cores - 1))


def build_checkpointer(cfg: CfgNode, model, **checkpointables) -> DetrCheckpointer:
    """The checkpointer every entry point uses, so official files load the same way everywhere."""
    return DetrCheckpointer(model, cfg.OUTPUT_DIR, **checkpointables)


def resolve_class_layout(cfg: CfgNode) -> None:
    """Write the model's class layout (and for ``NUM_CLASSES 0`` the count) into the unfrozen
    ``cfg``, after the datasets are registered, so that the ``config.yaml`` of a run builds the
    same model where the datasets are not available."""
    layout = layout_from_cfg(cfg)
    set_layout_keys(cfg, layout)
    logger.info(
        f"Class layout ({layout.source}): {layout.num_classes} classes, {', '.join(layout.names[:10])}"
        + (", ..." if layout.num_classes > 10 else "")
    )


def resolve_epoch_schedule(cfg: CfgNode) -> None:
    """``SOLVER.EPOCHS`` (when ``MAX`` > 0) into ``SOLVER.MAX_ITER``, ``STEPS`` and
    ``WARMUP_ITERS`` of the unfrozen ``cfg``, from the number of training images the loader
    sees and ``SOLVER.IMS_PER_BATCH``: a schedule that follows the user's dataset size. Logged,
    and written into the run's config.yaml."""
    epochs = cfg.SOLVER.EPOCHS
    if epochs.MAX <= 0:
        return
    if any(step > epochs.MAX for step in epochs.STEPS) or epochs.WARMUP > epochs.MAX:
        raise ValueError(
            f"SOLVER.EPOCHS.STEPS {list(epochs.STEPS)} and WARMUP {epochs.WARMUP} must lie within "
            f"SOLVER.EPOCHS.MAX {epochs.MAX}."
        )
    images = len(
        get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
    )
    per_epoch = images / cfg.SOLVER.IMS_PER_BATCH
    cfg.SOLVER.MAX_ITER = max(1, round(epochs.MAX * per_epoch))
    cfg.SOLVER.STEPS = tuple(round(step * per_epoch) for step in epochs.STEPS)
    cfg.SOLVER.WARMUP_ITERS = round(epochs.WARMUP * per_epoch)
    logger.info(
        f"SOLVER.EPOCHS: {images} training images in batches of {cfg.SOLVER.IMS_PER_BATCH} -> "
        f"MAX_ITER {cfg.SOLVER.MAX_ITER}, STEPS {cfg.SOLVER.STEPS}, WARMUP_ITERS "
        f"{cfg.SOLVER.WARMUP_ITERS}."
    )


class _DetrSimpleTrainer(NonFiniteLossCheck, SimpleTrainer):
    pass


class _DetrAMPTrainer(NonFiniteLossCheck, SimpleTrainer):
    """Mixed-precision training on any device, written for ``torch.autocast`` (Detectron2's
    ``AMPTrainer.run_step`` asserts CUDA and uses ``torch.cuda.amp``, so it is not used): the
    forward under autocast in ``precision``, the loss terms summed in fp32, backward and the
    optimizer step through a ``torch.amp.GradScaler`` that scales only for fp16 (bf16 has fp32's
    range). The scaler's state is checkpointed under ``"grad_scaler"``, the key ``AMPTrainer``
    uses, so runs saved by either resume with the other."""

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype):
        super().__init__(model, data_loader, optimizer)
        self.device_type = next(model.parameters()).device.type
        self.precision = precision
        self.grad_scaler = torch.amp.GradScaler(
            self.device_type, enabled=precision == torch.float16
        )

    def run_step(self):
        # PyTorch's recipe (docs "Automatic Mixed Precision", typical training step): autocast
        # the forward only; unscale before the optimizer's full-model clipping
        assert self.model.training, "[_DetrAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)  # the criterion inside runs in fp32
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)  # stops on non-finite terms before the step
        # unscaled here, as the recipe for clipping says: a fused optimizer's step would
        # otherwise receive the scale and clip scaled gradients
        self.grad_scaler.unscale_(self.optimizer)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self):
        return {**super().state_dict(), "grad_scaler": self.grad_scaler.state_dict()}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def build_step_trainer(cfg: CfgNode, model, data_loader, optimizer) -> SimpleTrainer:
    """The per-iteration trainer: fp32, or mixed precision with ``SOLVER.AMP.ENABLED`` in
    ``SOLVER.AMP.PRECISION`` ("fp16" on GPUs, "bf16" on CPUs and GPUs)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return _DetrSimpleTrainer(model, data_loader, optimizer)
    device_type = next(model.parameters()).device.type
    precision = precision_dtype(cfg.SOLVER.AMP.PRECISION, "SOLVER.AMP.PRECISION", device_type)
    if precision == torch.float32:
        return _DetrSimpleTrainer(model, data_loader, optimizer)
    return _DetrAMPTrainer(model, data_loader, optimizer, precision)


class DetrTrainer(DefaultTrainer):
    """``DefaultTrainer`` with DETR's optimizer, data mapper, COCO evaluation and checkpoint
    loader, DDP that also works for CPU models (gloo), and exactly resumable training data
    (the checkpoint holds the data seed and the RNG states; the sample stream skips ahead)."""

    def __init__(self, cfg: CfgNode):
        """Built from Detectron2's public parts in ``DefaultTrainer.__init__``'s order (the
        ``build_*`` class methods, ``create_ddp_model``, the hooks), with our step trainer
        (:func:`build_step_trainer`), DDP that also takes CPU models (no ``device_ids``, which
        DDP refuses for them; gloo), and :class:`~detr_d2.checkpoint.DetrCheckpointer`. It sets
        the attributes ``DefaultTrainer``'s other methods use (tests/test_compat.py checks them
        against upstream's ``__init__``); logging is set up by the entry points
        (``default_setup``)."""
        if cfg.DATASETS.TEST:
            cocoeval_class(cfg)  # a misspelt TEST.COCO_EVAL_BACKEND fails now, not after training
        TrainerBase.__init__(self)  # not DefaultTrainer's: it builds Detectron2's parts
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        # DefaultTrainer's order: the optimizer takes the bare model's parameters, DDP wraps later
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            device_ids=None if on_cpu else [comm.get_local_rank()],
        )
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # a proxy, as DefaultTrainer's: the checkpointer saves this trainer's state
        self.checkpointer = DetrCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())  # adds the EMA hook (see build_hooks)
        self.data_sampler = getattr(self.data_loader, "resumable_sampler", None)
        log_model_report(self.model, self.cfg)
        check_feature_cache(cfg, unwrap(self.model))  # fails before the first step

    def build_hooks(self):
        """Detectron2's hooks; with ``SOLVER.EMA.ENABLED`` the EMA update runs right after the
        LR scheduler (before checkpointing and evaluation), and evaluation scores the EMA model."""
        self.ema_hook = (
            EMAHook(self.model, self.checkpointer, self.cfg.SOLVER.EMA.DECAY)
            if self.cfg.SOLVER.EMA.ENABLED
            else None
        )
        hook_list = super().build_hooks()
        if self.ema_hook is None:
            return hook_list

        def test_ema():
            self._last_eval_results = self.test(
                self.cfg, self.ema_hook.ema.averaged_model(unwrap(self.model))
            )
            return self._last_eval_results

        hook_list = [
            hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test_ema)
            if isinstance(h, hooks.EvalHook)
            else h
            for h in hook_list
        ]
        scheduler_at = next(i for i, h in enumerate(hook_list) if isinstance(h, hooks.LRScheduler))
        hook_list.insert(scheduler_at + 1, self.ema_hook)
        return hook_list

    def build_writers(self):
        """Detectron2's writers, with the console line made compact (:mod:`detr_d2.training_log`):
        ``metrics.json`` keeps every loss term."""
        return [
            CompactMetricPrinter(self.max_iter) if isinstance(w, CommonMetricPrinter) else w
            for w in super().build_writers()
        ]

    def resume_or_load(self, resume: bool = True):
        self._loaded_rng_state = None
        super().resume_or_load(resume=resume)
        if self.data_sampler is not None:
            # continue the sample stream where the checkpointed iteration left it
            self.data_sampler.start = self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH
            if self.start_iter:
                logger.info(f"Resuming the training data at sample {self.data_sampler.start}.")
        # Start the data loader now: creating its iterator draws from the global torch RNG, which
        # an uninterrupted run did before the checkpointed RNG state was taken.
        start_data_loader(self._trainer)
        if self._loaded_rng_state is not None:
            set_rng_state(self._loaded_rng_state)

    def state_dict(self):
        state = super().state_dict()
        state["rng"] = rng_state()
        if self.data_sampler is not None:
            state["data_seed"] = self.data_sampler.seed
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._loaded_rng_state = state.get("rng")  # applied at the end of resume_or_load
        if "data_seed" in state and self.data_sampler is not None:
            self.data_sampler.seed = state["data_seed"]

    @classmethod
    def test(cls, cfg: CfgNode, model, evaluators=None):
        """Detectron2's evaluation loop on the inference model (``TEST.FOLD_BATCHNORM``: a copy
        with batch norms folded; the training model is untouched)."""
        return super().test(cfg, inference_model(model, cfg), evaluators)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model) -> torch.optim.Optimizer:
        return build_detr_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Detectron2's batched loader over DETR's mapper, with a resumable sample stream
        (exposed as ``loader.resumable_sampler``)."""
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        dataset = drop_degenerate_boxes(dataset, ", ".join(cfg.DATASETS.TRAIN))
        layout = layout_from_cfg(cfg)
        check_labels_fit(dataset, layout.num_classes, ", ".join(cfg.DATASETS.TRAIN))
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        groups = None
        if cfg.DATALOADER.ASPECT_RATIO_GROUPING:  # in the sampler, where it resumes exactly
            groups = aspect_ratio_groups(dataset, ", ".join(cfg.DATASETS.TRAIN))
        sampler = ResumableTrainingSampler(
            len(dataset), seed=seed, groups=groups, batch_size=cfg.SOLVER.IMS_PER_BATCH
        )
        loader = build_detection_train_loader(
            dataset=SeededMapDataset(dataset, DetrDatasetMapper(cfg, is_train=True)),
            mapper=None,
            sampler=sampler,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=False,  # the sampler's stream is grouped already
            num_workers=resolve_num_workers(cfg),
        )
        loader.resumable_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(
            cfg,
            dataset_name,
            mapper=DetrDatasetMapper(cfg, is_train=False),
            num_workers=resolve_num_workers(cfg),
        )

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        """The evaluators of the dataset's ``evaluator_type`` (see ``EVALUATORS``)."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        build = EVALUATORS.get(evaluator_type, coco_evaluators)
        evaluators = build(cfg, dataset_name, output_folder)
        if not evaluators:
            raise ValueError(
                f"Nothing to evaluate on {dataset_name!r} ({evaluator_type}): set MODEL.DETR.TEST."
                f"PANOPTIC_ON and/or MODEL.DETR.TEST.INSTANCE_ON True, or DATASETS.TEST ()."
            )
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
