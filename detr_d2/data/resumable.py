"""Training data that resumes exactly: the sample order and every augmentation are functions of
(seed, position in the sample stream), so a resumed run sees what the interrupted one would have.

Detectron2's ``TrainingSampler`` restarts its stream on resume and augmentations draw from each
worker's global NumPy state, so a resumed run repeats early samples with new augmentations.
"""

import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence

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

    With ``groups`` (a group id per dataset index, e.g. landscape/portrait) and ``batch_size``
    (the global batch), the shuffled stream is regrouped so that every run of ``batch_size``
    positions (one global batch) holds one group: each index waits in its group's bucket until
    the bucket is full, and buckets carry over epoch boundaries. This is Detectron2's aspect
    ratio grouping done in the sampler, so it is a function of (seed, position) too and resumes
    exactly (Detectron2's groups per loader worker and restarts its buckets on resume).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        start: int = 0,
        groups: Sequence[int] | None = None,
        batch_size: int | None = None,
    ):
        if size <= 0:
            raise ValueError(
                "The training set is empty: check DATASETS.TRAIN and its annotation files."
            )
        if groups is not None and (len(groups) != size or not batch_size or batch_size < 1):
            raise ValueError(
                f"groups needs one group id per sample ({len(groups)} for {size}) and a batch size "
                f"(got {batch_size})."
            )
        self.size = size
        self.seed = int(seed)
        self.start = start
        self.groups = list(groups) if groups is not None else None
        self.batch_size = batch_size
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def _indices(self) -> Iterator[int]:
        """The dataset indices of the global stream from position ``start`` on."""
        if self.groups is None:
            epoch, offset = divmod(self.start, self.size)
            for e in itertools.count(epoch):
                yield from self._epoch_order(e)[offset:]
                offset = 0
            return
        # grouped: replayed from position 0 (the buckets depend on everything before)
        buckets: dict[int, list[int]] = {}
        stream = (
            run
            for e in itertools.count()
            for index in self._epoch_order(e)
            if (run := _fill(buckets, self.groups[index], index, self.batch_size))
        )
        skip, offset = divmod(self.start, self.batch_size)
        for run in itertools.islice(stream, skip, None):
            yield from run[offset:]
            offset = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self._indices(), start=self.start):
            if position % self.world_size == self.rank:
                yield sample_seed(self.seed, position), index


def _fill(buckets: dict[int, list[int]], group: int, index: int, size: int) -> list[int] | None:
    """Add ``index`` to its group's bucket; return the bucket's run when it is full."""
    bucket = buckets.setdefault(group, [])
    bucket.append(index)
    if len(bucket) < size:
        return None
    buckets[group] = []
    return bucket


def aspect_ratio_groups(dataset: list[dict], source: str) -> list[int]:
    """0 for landscape (width > height), 1 otherwise, as Detectron2's aspect ratio grouping;
    from the dataset dicts' ``width`` and ``height``."""
    missing = [
        d.get("image_id", d.get("file_name"))
        for d in dataset
        if not {"width", "height"} <= d.keys()
    ]
    if missing:
        raise ValueError(
            f"DATALOADER.ASPECT_RATIO_GROUPING needs the width and height of every image; "
            f"{len(missing)} images of {source} lack them (first: {missing[0]})."
        )
    return [0 if d["width"] > d["height"] else 1 for d in dataset]


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
