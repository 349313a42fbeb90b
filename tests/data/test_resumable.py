"""The resumable sample stream: resuming at any position gives the rest of the same stream, ranks
split it as one process would see it, and aspect ratio grouping gives one-group batches."""

import itertools
from collections import Counter

import pytest

from detr_d2.data.resumable import ResumableTrainingSampler, aspect_ratio_groups


def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


GROUPS = [0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0]  # 5 landscape, 8 portrait


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["random", "grouped"])
@pytest.mark.parametrize("start", [0, 3, 8, 13, 27, 40])
def test_resume_at_any_position_continues_the_same_stream(groups, start):
    full = take(ResumableTrainingSampler(13, seed=3, groups=groups, batch_size=4), 80)
    resumed = ResumableTrainingSampler(13, seed=3, groups=groups, batch_size=4)
    resumed.start = start
    assert take(resumed, 80 - start) == full[start:]


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["random", "grouped"])
def test_two_ranks_split_the_one_process_stream(groups):
    full = take(ResumableTrainingSampler(13, seed=3, groups=groups, batch_size=4), 40)
    ranks = []
    for rank in range(2):
        sampler = ResumableTrainingSampler(13, seed=3, groups=groups, batch_size=4)
        sampler.rank, sampler.world_size = rank, 2
        ranks.append(take(sampler, 20))
    assert [x for pair in zip(*ranks) for x in pair] == full


def test_grouped_batches_hold_one_group_and_every_sample_keeps_its_share():
    stream = [
        i
        for _, i in take(ResumableTrainingSampler(13, seed=1, groups=GROUPS, batch_size=4), 13 * 40)
    ]
    batches = [stream[k : k + 4] for k in range(0, len(stream), 4)]
    assert all(len({GROUPS[i] for i in batch}) == 1 for batch in batches)
    assert {GROUPS[b[0]] for b in batches} == {0, 1}
    # over 40 epochs each sample is drawn 40 times, less what waits in a bucket (< 4 per group)
    counts = Counter(stream)
    assert set(counts) == set(range(13)) and min(counts.values()) >= 38
    # the grouped stream is a regrouping, not a new order: the same seed, another grouping
    random = [i for _, i in take(ResumableTrainingSampler(13, seed=1), 13)]
    assert sorted(random) == list(range(13)) and random != stream[:13]


def test_aspect_ratio_groups_need_sizes():
    dicts = [{"width": 30, "height": 20}, {"width": 20, "height": 30}, {"width": 5, "height": 5}]
    assert aspect_ratio_groups(dicts, "faces") == [0, 1, 1]
    with pytest.raises(ValueError, match=r"ASPECT_RATIO_GROUPING.*1 images of faces.*first: 7"):
        aspect_ratio_groups([{"image_id": 7, "file_name": "a.png"}], "faces")
    with pytest.raises(ValueError, match="one group id per sample"):
        ResumableTrainingSampler(3, seed=0, groups=[0, 1], batch_size=2)
