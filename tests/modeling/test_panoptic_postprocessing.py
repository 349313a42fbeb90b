"""Panoptic, instance-mask and semantic post-processing on hand-made logits.

Classes here: 0..2 things, 3..5 stuff, 6 "no object" (K = 6).
"""

from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detr_d2.modeling.postprocessing import instance_masks, panoptic_inference, semantic_inference

THINGS = (0, 1, 2)
NO_OBJECT = 6


def class_logits(labels, confidence=10.0):
    """[Q, 7] logits whose softmax puts almost all mass on ``labels[q]``."""
    logits = torch.zeros(len(labels), NO_OBJECT + 1)
    logits[torch.arange(len(labels)), torch.as_tensor(labels)] = confidence
    return logits


def test_nothing_kept_gives_an_all_void_map():
    masks = torch.randn(3, 5, 7)
    for labels, threshold in [([NO_OBJECT] * 3, 0.5), ([0, 3, 4], 0.99999)]:
        segment_ids, segments_info = panoptic_inference(
            class_logits(labels), masks, (20, 28), (10, 14), THINGS, threshold
        )
        assert segments_info == []
        assert (
            segment_ids.dtype == torch.int32
            and segment_ids.shape == (10, 14)
            and not segment_ids.any()
        )


def test_each_pixel_goes_to_the_highest_mask_logit():
    masks = torch.zeros(2, 4, 6)
    masks[0], masks[0, :, :2] = -1.0, 3.0  # query 0 (thing 1) wins the two left columns
    segment_ids, segments_info = panoptic_inference(
        class_logits([1, 4]), masks, (4, 6), (4, 6), THINGS, 0.5
    )
    assert segment_ids[:, :2].eq(1).all() and segment_ids[:, 2:].eq(2).all()
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in segments_info] == [
        (1, 1, True, 8),
        (2, 4, False, 16),
    ]
    assert segments_info[0]["score"] == pytest.approx(F.softmax(class_logits([1])[0], -1)[1].item())


def test_stuff_of_one_class_is_merged_first_then_reassigned_without_merging():
    """Official rule: queries 0 and 1 are both stuff class 3. In the first pass query 1's pixels
    count for query 0, so query 1 is empty and dropped; then every pixel goes to the best of
    the remaining queries, so query 1's right half goes to the thing (query 2), whose logit
    beats query 0's there, not to the merged stuff."""
    masks = torch.zeros(3, 8, 8)
    masks[0, :, :4], masks[0, :, 4:] = 5.0, 1.0
    masks[1, :, :4], masks[1, :, 4:] = -5.0, 5.0
    masks[2, :, :4], masks[2, :, 4:7], masks[2, :, 7] = 0.0, 3.0, 9.0
    segment_ids, segments_info = panoptic_inference(
        class_logits([3, 3, 0]), masks, (8, 8), (8, 8), THINGS, 0.5
    )
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in segments_info] == [
        (1, 3, False, 32),
        (2, 0, True, 32),
    ]
    assert segment_ids[:, :4].eq(1).all() and segment_ids[:, 4:].eq(2).all()


def test_merged_stuff_keeps_the_duplicates_pixels_when_it_is_the_best_left():
    masks = torch.zeros(3, 8, 8)
    masks[0, :, :4], masks[0, :, 4:] = 5.0, 4.0
    masks[1, :, :4], masks[1, :, 4:] = -5.0, 5.0
    masks[2] = -9.0
    segment_ids, segments_info = panoptic_inference(
        class_logits([5, 5, 1]), masks, (8, 8), (8, 8), THINGS, 0.5
    )
    assert [(s["id"], s["category_id"], s["area"]) for s in segments_info] == [(1, 5, 64)]
    assert segment_ids.eq(1).all()


def test_small_segments_are_dropped_and_ids_renumbered():
    masks = torch.zeros(4, 6, 6)
    masks[1, 0, :4] = 5.0  # 4 pixels: dropped (area <= 4)
    masks[2, 2:, 2:] = 5.0  # 16 pixels: kept
    masks[3, 5, 0] = 5.0  # 1 pixel: dropped
    segment_ids, segments_info = panoptic_inference(
        class_logits([3, 0, 1, 2]), masks, (6, 6), (6, 6), THINGS, 0.5
    )
    assert [(s["id"], s["category_id"], s["area"]) for s in segments_info] == [
        (1, 3, 20),
        (2, 1, 16),
    ]
    assert set(segment_ids.unique().tolist()) == {1, 2}
    assert (
        segment_ids[0, :4].eq(1).all() and segment_ids[5, 0] == 1
    )  # the dropped pixels were re-assigned


def test_all_segments_too_small_gives_an_all_void_map():
    masks = torch.zeros(2, 2, 2)
    masks[0, 0] = 1.0
    segment_ids, segments_info = panoptic_inference(
        class_logits([0, 3]), masks, (2, 2), (2, 2), THINGS, 0.5
    )
    assert segments_info == [] and not segment_ids.any()


def official_panoptic(logits, masks, image_size, output_size, threshold):
    """The official PostProcessPanoptic's rules, restated step by step for one image with numpy
    and PIL (its id map goes through a PIL NEAREST resize of an RGB-encoded PNG)."""
    scores, labels = logits.softmax(-1).max(-1)
    keep = (labels != logits.shape[-1] - 1) & (scores > threshold)
    scores, labels = scores[keep], labels[keep].tolist()
    masks = F.interpolate(
        masks[keep][:, None], size=image_size, mode="bilinear", align_corners=False
    )[:, 0].flatten(1)
    stuff = defaultdict(list)
    for k, label in enumerate(labels):
        if label not in THINGS:
            stuff[label].append(k)

    def ids_and_areas(masks, count, dedup):
        ids = (
            masks.T.softmax(-1).argmax(-1).view(image_size).numpy()
            if count
            else np.zeros(image_size, np.int64)
        )
        if dedup:
            for same in stuff.values():
                for k in same:
                    ids[ids == k] = same[0]
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        rgb = np.asarray(Image.fromarray(rgb).resize(output_size[::-1], Image.NEAREST)).astype(
            np.int64
        )
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        return ids, [int((ids == i).sum()) for i in range(count)]

    ids, areas = ids_and_areas(masks, len(labels), True)
    while labels:
        small = [a <= 4 for a in areas]
        if not any(small):
            break
        kept = [i for i, s in enumerate(small) if not s]
        masks, labels = masks[kept], [labels[i] for i in kept]
        ids, areas = ids_and_areas(masks, len(labels), False)
    return ids, list(zip(labels, areas))


@pytest.mark.parametrize("seed", range(12))
def test_matches_the_official_rules_on_random_inputs(seed):
    """Many stuff duplicates, small segments, a padded grid, and outputs larger, smaller or
    equal to the image size."""
    g = torch.Generator().manual_seed(seed)
    num_queries = 16
    logits = torch.randn(num_queries, NO_OBJECT + 1, generator=g) * 3
    logits[:, 3:6] += 2.0  # lots of stuff queries, hence duplicates
    coarse = torch.randn(num_queries, 4, 5, generator=g) * 4
    masks = F.interpolate(coarse[None], size=(11, 14), mode="bilinear", align_corners=False)[
        0
    ]  # padded grid
    masks += torch.randn(masks.shape, generator=g)
    image_size = [(40, 50), (37, 53), (44, 31)][seed % 3]
    output_size = [image_size, (61, 79), (23, 29), (40, 71)][seed % 4]
    threshold = [0.0, 0.3, 0.6][seed % 3]
    ids, info = official_panoptic(logits, masks, image_size, output_size, threshold)
    segment_ids, segments_info = panoptic_inference(
        logits, masks, image_size, output_size, THINGS, threshold
    )
    assert [(s["category_id"], s["area"]) for s in segments_info] == info
    assert [s["id"] for s in segments_info] == list(range(1, len(info) + 1))
    assert all(s["isthing"] == (s["category_id"] in THINGS) for s in segments_info)
    expected = torch.from_numpy(ids + 1) if info else torch.zeros(output_size, dtype=torch.int64)
    assert torch.equal(segment_ids.long(), expected)


def test_instance_masks_are_cropped_then_resized():
    """Official PostProcessSegm: upsample to the padded size, threshold, crop, resize (nearest)."""
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, :, :2] = 5.0  # left half of a padded 12 x 16 batch
    masks = instance_masks(logits, padded_size=(12, 16), image_size=(12, 8), output_size=(24, 16))
    assert masks.dtype == torch.bool and masks.shape == (1, 24, 16)
    assert masks.all()  # the image is the left half: all foreground
    empty = instance_masks(torch.zeros(0, 3, 4), (12, 16), (12, 8), (24, 16))
    assert empty.shape == (0, 24, 16)


def test_semantic_scores_marginalise_queries():
    logits = class_logits([0, 4], confidence=50.0)
    masks = torch.full((2, 2, 2), -50.0)
    masks[0, 0] = 50.0
    scores = semantic_inference(
        logits, masks, padded_size=(2, 2), image_size=(2, 2), output_size=(4, 4)
    )
    assert scores.shape == (NO_OBJECT, 4, 4)
    # bilinear resize to 4 x 4: the outer rows keep the values of the 2 x 2 input
    assert scores[0, 0].min() > 0.99 and scores[0, 3].max() < 0.01 and scores[4].max() < 0.01
