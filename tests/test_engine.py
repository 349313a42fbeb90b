"""detr_d2.engine helpers: the automatic loader worker count."""

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
