"""A compact console line for DETR training: the last decoder layer's terms and one sum per loss
branch, instead of every term.

Why: with deep supervision and the training-only aids a DETR step logs dozens of terms (39 for
the sample config: 3 per decoder layer, again for the one-to-many queries, 2 dense); printed as
Detectron2's ``CommonMetricPrinter`` does, every 20 iterations, that is a line of ~1,000
characters nobody reads. The console gets ``total_loss``, the last layer's terms and a sum per
branch (``aux`` for the earlier decoder layers, ``o2m``, ``dn``, ``dense``); ``metrics.json``
(Detectron2's ``JSONWriter``) still holds every term, and ``tools/plot_metrics.py`` draws them.
"""

import datetime
import logging
import re

from detectron2.utils.events import EventWriter, get_event_storage

__all__ = ["CompactMetricPrinter", "loss_branch"]

# (branch, pattern) in order: the first match names a term's branch; "" = shown on its own
_BRANCHES = (
    ("dense", re.compile(r"^loss_dense_")),
    ("o2m", re.compile(r"_o2m$")),
    ("dn", re.compile(r"_dn$")),
    ("aux", re.compile(r"^loss_[a-z]+_\d+$")),
    ("", re.compile(r"^(loss_[a-z]+|total_loss)$")),
)


def loss_branch(name: str) -> str | None:
    """The branch a logged loss term belongs to ("" for the last layer's terms and the total),
    ``None`` for a scalar that is no loss term."""
    for branch, pattern in _BRANCHES:
        if pattern.search(name):
            return branch
    return "other" if "loss" in name else None


class CompactMetricPrinter(EventWriter):
    """Every ``period`` iterations, one console line: iteration, ETA, total loss, the last
    layer's terms, one sum per branch (medians over ``window_size`` iterations), seconds per
    iteration and per data batch, LR."""

    def __init__(self, max_iter: int, window_size: int = 20):
        self.logger = logging.getLogger("detectron2.utils.events")
        self._max_iter = max_iter
        self._window_size = window_size

    def _median(self, storage, name: str) -> float:
        return storage.history(name).median(storage.count_samples(name, self._window_size))

    def write(self):
        storage = get_event_storage()
        iteration = storage.iter
        if iteration == self._max_iter:  # training is over: progress lines only
            return
        histories = storage.histories()
        parts = [f"iter: {iteration}"]
        if "time" in histories:
            seconds = histories["time"].global_avg()
            remaining = int(seconds * (self._max_iter - iteration - 1))
            parts.append(f"eta: {datetime.timedelta(seconds=remaining)}")
        sums: dict[str, float] = {}
        for name in histories:
            branch = loss_branch(name)
            if branch == "":
                parts.append(f"{name}: {self._median(storage, name):.4g}")
            elif branch is not None:
                sums[branch] = sums.get(branch, 0.0) + self._median(storage, name)
        parts += [f"{branch}: {value:.4g}" for branch, value in sums.items()]
        for name, label in (("time", "time"), ("data_time", "data_time")):
            if name in histories:
                parts.append(f"{label}: {self._median(storage, name):.4f}")
        if "lr" in histories:
            parts.append(f"lr: {histories['lr'].latest():.5g}")
        self.logger.info("  ".join(parts))
