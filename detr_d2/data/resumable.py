"""Training data that resumes exactly: the sample order and every augmentation are functions of
(seed, position in the sample stream), so a resumed run sees what the interrupted one would have.

Detectron2's ``TrainingSampler`` restarts its stream on resume and augmentations draw from each
worker's global NumPy state, so a resumed run repeats early samples with new augmentations.
"""

import itertools
import logging
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)


class ResumableTrainingSampler(Sampler):
    """Infinite stream of ``(sample_seed, dataset_index)``, shuffled per epoch, sharded over ranks.

    Position ``p`` of the global stream goes to rank ``p % world_size`` (as Detectron2's
    ``TrainingSampler``), so N processes with batch B/N see the same samples per iteration as one
    process with batch B. ``start`` (samples already consumed by all ranks together) skips ahead
    without reading any data; set it before the data loader iterator is created.
    """

    def __init__(self, size: int, seed: int, start: int = 0):
        if size <= 0:
            raise ValueError(
                "The training set is empty: check DATASETS.TRAIN and its annotation files."
            )
        self.size = size
        self.seed = int(seed)
        self.start = start
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.size)
        position = self.start
        for e in itertools.count(epoch):
            order = self._epoch_order(e)
            for index in order[offset:]:
                if position % self.world_size == self.rank:
                    yield sample_seed(self.seed, position), index
                position += 1
            offset = 0


def sample_seed(seed: int, position: int) -> int:
    """A 32-bit seed for the augmentations of one stream position, well mixed across positions."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class SeededMapDataset(Dataset):
    """Map ``(sample_seed, index)`` to ``mapper(dataset[index])`` with NumPy's and Python's global
    random state seeded by ``sample_seed`` (Detectron2's augmentations draw from them)."""

    def __init__(self, dataset: list[dict], mapper: Callable[[dict], dict]):
        self.dataset = DatasetFromList(
            dataset, copy=False
        )  # serialized: cheap to share with workers
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, seed_and_index: tuple[int, int]) -> dict:
        seed, index = seed_and_index
        np.random.seed(seed)
        random.seed(seed)
        return self.mapper(self.dataset[index])


def rng_state() -> dict:
    """Global RNG states of this process (torch, CUDA, NumPy, Python) in checkpoint-safe types
    (tensors, lists, ints), for dropout and anything else drawn in the training process."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
