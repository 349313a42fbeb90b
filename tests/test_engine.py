"""detr_d2.engine: the automatic loader worker count, and what the trainer is built from."""

import pytest

from detr_d2 import engine
from detr_d2.engine import resolve_num_workers

from helpers import tiny_cfg


def test_explicit_num_workers_is_kept():
    cfg = tiny_cfg()
    cfg.DATALOADER.NUM_WORKERS = 3
    assert resolve_num_workers(cfg) == 3


def test_num_workers_auto_on_cpu_is_one(monkeypatch):
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: set(range(64)))
    cfg = tiny_cfg()
    cfg.DATALOADER.NUM_WORKERS = -1
    assert resolve_num_workers(cfg) == 1  # CPU training keeps its cores for the model


@pytest.mark.parametrize(
    "cores, local_processes, workers",
    [(1, 1, 1), (2, 1, 1), (3, 1, 2), (5, 1, 4), (64, 1, 4), (8, 2, 3), (8, 4, 1), (8, 8, 1)],
)
def test_num_workers_auto_on_gpu_by_cores_per_process(monkeypatch, cores, local_processes, workers):
    """A GPU process gets its share of the cores less one for itself, between 1 and 4."""
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(engine.comm, "get_local_size", lambda: local_processes)
    cfg = tiny_cfg()
    cfg.DATALOADER.NUM_WORKERS = -1
    cfg.MODEL.DEVICE = "cuda"  # only read as a device type: no GPU is needed
    assert resolve_num_workers(cfg) == workers


class _Loader(list):
    """A stand-in training loader (never iterated here) with a resumable sampler."""

    resumable_sampler = object()


@pytest.mark.parametrize("amp, ema", [(False, False), (True, True)])
def test_trainer_builds_detectron2s_parts_with_ours(monkeypatch, tmp_path, amp, ema):
    """``DetrTrainer`` builds what Detectron2's ``DefaultTrainer.__init__`` does, from public parts
    (see detr_d2/compat.py item 7), with our step trainer, checkpointer and hooks, and does not
    set up Detectron2's logger."""
    import logging

    from detectron2.engine import hooks

    from detr_d2.checkpoint import DetrCheckpointer
    from detr_d2.compat import AtomicWrites
    from detr_d2.ema import EMAHook

    monkeypatch.setattr(
        engine.DetrTrainer, "build_train_loader", classmethod(lambda c, g: _Loader())
    )
    cfg = tiny_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.SOLVER.AMP.update(ENABLED=amp, PRECISION="bf16")
    cfg.SOLVER.EMA.ENABLED = ema
    cfg.SOLVER.MAX_ITER = 11
    handlers = list(logging.getLogger("detectron2").handlers)
    trainer = engine.DetrTrainer(cfg)
    assert logging.getLogger("detectron2").handlers == handlers
    expected = engine._DetrAMPTrainer if amp else engine._DetrSimpleTrainer
    assert type(trainer._trainer) is expected and trainer.model is trainer._trainer.model
    assert type(trainer.checkpointer) is DetrCheckpointer
    assert isinstance(trainer.checkpointer.path_manager, AtomicWrites)
    assert trainer.checkpointer.save_dir == str(tmp_path)
    assert trainer.data_sampler is _Loader.resumable_sampler
    assert trainer.start_iter == 0 and trainer.max_iter == 11 and trainer.cfg.SOLVER.MAX_ITER == 11
    kinds = [type(h) for h in trainer._hooks]
    if ema:
        assert isinstance(trainer.ema_hook, EMAHook)
        assert kinds.index(EMAHook) == kinds.index(hooks.LRScheduler) + 1
        assert kinds.index(EMAHook) < kinds.index(hooks.PeriodicCheckpointer)
        assert trainer.checkpointer.saved_model_state == trainer.ema_hook.ema.state_dict
    else:
        assert trainer.ema_hook is None and EMAHook not in kinds
        assert trainer.checkpointer.saved_model_state is None


def test_auto_precision_is_recorded_and_kept_on_resume(monkeypatch, tmp_path):
    """ "auto" becomes the measured precision in the config (so config.yaml records it); a resume
    takes the recorded choice even where a new measurement would pick another one."""
    from detr_d2 import precision

    monkeypatch.setattr(precision, "_auto_precision", lambda device_type: "bf16")
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.PRECISION = cfg.TEST.PRECISION = "auto"
    engine.resolve_auto_precision(cfg)
    assert (cfg.SOLVER.AMP.PRECISION, cfg.TEST.PRECISION) == ("bf16", "bf16")

    (tmp_path / "config.yaml").write_text(cfg.dump())
    assert engine.recorded_config(str(tmp_path)) is None  # nothing to resume from yet
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    recorded = engine.recorded_config(str(tmp_path))
    monkeypatch.setattr(precision, "_auto_precision", lambda device_type: "fp32")
    resumed = tiny_cfg()
    resumed.SOLVER.AMP.PRECISION = resumed.TEST.PRECISION = "auto"
    engine.resolve_auto_precision(resumed, recorded)
    assert (resumed.SOLVER.AMP.PRECISION, resumed.TEST.PRECISION) == ("bf16", "bf16")
    fresh = tiny_cfg()
    fresh.SOLVER.AMP.PRECISION = "auto"
    engine.resolve_auto_precision(fresh)
    assert fresh.SOLVER.AMP.PRECISION == "fp32"
