"""A frozen backbone trains through a copy with folded batch norms: same losses and gradients
(up to float rounding), same checkpoint keys, rebuilt when the weights change. The feature cache
of its frozen stages (MODEL.DETR.SPEED.FEATURE_CACHE): the same losses and gradients as the uncached
path on the same views, hits return the stored features, a budget that is too small or a random
crop fails with the key's name, and inference does not use it."""

import copy

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from detr_d2.modeling.feature_cache import FeatureCache, check_feature_cache
from detr_d2.modeling.frozen_backbone import has_foldable_frozen_part

from helpers import build_model_no_weights, tiny_cfg


def _batch(sizes=((64, 80), (72, 56)), seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for h, w in sizes:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 40.0, 50.0]]))
        instances.gt_classes = torch.tensor([1])
        image = torch.randint(0, 255, (3, h, w), generator=generator).float()
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


def _cache_cfg(freeze_at=4, **cache):
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.INPUT.CROP.ENABLED = False
    cfg.MODEL.DETR.SPEED.FEATURE_CACHE.update(ENABLED=True, **cache)
    return cfg


def _frozen_model(freeze_at=5, feature_cache=False):
    cfg = _cache_cfg(freeze_at) if feature_cache else tiny_cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    # BN frozen by FREEZE_AT becomes FrozenBatchNorm2d; a trained stage needs frozen norms
    cfg.MODEL.RESNETS.NORM = "BN" if freeze_at == 5 else "FrozenBN"
    model = build_model_no_weights(cfg).train()
    with torch.no_grad():  # statistics and affine terms that make folding do something
        for name, buffer in model.backbone.named_buffers():
            if name.endswith(("running_mean", "bias")):
                buffer.normal_(0, 0.1)
            elif name.endswith(("running_var", "weight")):
                buffer.uniform_(0.5, 1.5)
    return model


def _losses_and_grads(model, batch=None):
    model.zero_grad()
    with EventStorage():
        losses = model(batch or _batch())
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("freeze_at", [5, 4])  # 4: res5 trains through the copy
def test_folded_copy_gives_the_same_losses_and_gradients(freeze_at):
    model = _frozen_model(freeze_at)
    assert has_foldable_frozen_part(model.backbone)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    plain_model = copy.deepcopy(model)
    plain_model._folded_backbone = lambda backbone, pixels: backbone(pixels)  # the plain path
    plain_optimizer = torch.optim.SGD(
        [p for p in plain_model.parameters() if p.requires_grad], lr=0.1
    )
    for step in range(2):  # the second step sees the trained res5 through the same copy
        folded_losses, folded_grads = _losses_and_grads(model)
        losses, grads = _losses_and_grads(plain_model)
        for key, value in losses.items():
            assert folded_losses[key] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), key
        trained = {n for n in grads if n.startswith("backbone.")}
        assert set(grads) == set(folded_grads) and bool(trained) == (freeze_at == 4)
        assert all(n.startswith("backbone.res5.") for n in trained)
        # rounding only: the gradient vectors agree to 0.1 % of their norm; after a step, a
        # rounding-sized change of a stem weight alone moves this random model's res5
        # gradient by ~2 % (measured), so the second step allows 5 %
        tolerance = 1e-3 if step == 0 else 5e-2
        for names in (sorted(grads), sorted(trained)):  # all, and the backbone's own
            if names:
                plain = torch.cat([grads[n].flatten() for n in names])
                folded = torch.cat([folded_grads[n].flatten() for n in names])
                assert (folded - plain).norm() <= tolerance * plain.norm(), (step, names[0])
        optimizer.step()
        plain_optimizer.step()
    assert model._folded_backbone._copy is not None  # the folded path ran
    shared = (
        model.backbone.res5[0].conv1.weight is model._folded_backbone._copy.res5[0].conv1.weight
    )
    assert shared == (freeze_at == 4)  # a trained stage is the model's own, not a copy


def test_checkpoint_keys_unchanged_and_copy_follows_new_weights():
    model = _frozen_model()
    keys = set(model.state_dict())
    _losses_and_grads(model)
    assert set(model.state_dict()) == keys  # the copy is no submodule
    pixels = torch.randn(1, 3, 64, 64)
    before = model._folded_backbone(model.backbone, pixels)["res5"]
    other = {
        k: (v * 1.1 if k.startswith("backbone.") and v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    model.load_state_dict(other)
    folded = model._folded_backbone(model.backbone, pixels)["res5"]
    plain = model.backbone(pixels)["res5"]
    scale = plain.abs().max()
    assert (folded - plain).abs().max() <= 1e-5 * scale
    assert (before - plain).abs().max() > 1e-2 * scale  # the old copy would be wrong


def _cached_and_plain(freeze_at=4):
    """(cached, uncached) models with the same weights, in training mode."""
    model = _frozen_model(freeze_at, feature_cache=True)
    plain = copy.deepcopy(model)
    plain.feature_cache = None
    assert model.feature_cache is not None and len(model.feature_cache._entries) == 0
    return model, plain


@pytest.mark.parametrize("freeze_at", [4, 5])  # 4: res5 trains on the cached res4 maps
@pytest.mark.parametrize("sizes", [[(64, 80)], [(64, 80), (64, 80)]], ids=["batch1", "batch2"])
def test_feature_cache_gives_the_same_losses_and_gradients(freeze_at, sizes):
    model, plain = _cached_and_plain(freeze_at)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch(sizes)
    for step in range(3):  # a miss, then hits; the trained res5 changes in between
        losses, grads = _losses_and_grads(model, batch)
        plain_losses, plain_grads = _losses_and_grads(plain, batch)
        assert set(losses) == set(plain_losses) and set(grads) == set(plain_grads)
        if len(sizes) == 1:  # the same convolutions on the same input: bit for bit
            assert all(torch.equal(losses[k], v) for k, v in plain_losses.items())
            assert all(torch.equal(grads[n], v) for n, v in plain_grads.items())
        # a batch of 2 through the frozen stages rounds differently from 2 batches of 1
        # (oneDNN; ~4e-7 of the gradient norm measured)
        for key, value in plain_losses.items():
            torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-6, msg=key)
        trained = sorted(n for n in plain_grads if n.startswith("backbone."))
        for names in (sorted(plain_grads), trained):  # all, and res5's own (on the cached maps)
            if names:
                plain_vector = torch.cat([plain_grads[n].flatten() for n in names])
                vector = torch.cat([grads[n].flatten() for n in names])
                assert (vector - plain_vector).norm() <= 1e-5 * plain_vector.norm(), step
        optimizer.step()
        plain.load_state_dict(model.state_dict())  # the same weights: rounding does not grow
    cache = model.feature_cache
    assert (cache.misses, cache.hits) == (len(sizes), 2 * len(sizes))
    assert any(n.startswith("backbone.res5.") for n in grads) == (freeze_at == 4)


def test_feature_cache_hit_returns_the_stored_features():
    model, _ = _cached_and_plain()
    batch = _batch([(64, 80), (64, 80)])
    _losses_and_grads(model, batch)
    cache = model.feature_cache
    stored = {k: {n: t.clone() for n, t in v.items()} for k, v in cache._entries.items()}
    assert len(stored) == 2 and cache.bytes > 0
    _losses_and_grads(model, batch)
    assert cache.hits == 2 and cache.misses == 2
    for key, entry in cache._entries.items():
        assert set(entry) == {"res4"}
        assert torch.equal(entry["res4"], stored[key]["res4"])
    flipped = [dict(x, image=x["image"].flip(-1)) for x in batch]  # another view of each
    _losses_and_grads(model, flipped)
    assert cache.misses == 4 and len(cache._entries) == 4
    # new frozen weights (a checkpoint load) empty the cache
    model.load_state_dict(
        {k: v * 1.01 if k.startswith("backbone.stem") else v for k, v in model.state_dict().items()}
    )
    _losses_and_grads(model, batch)
    assert cache.misses == 6 and len(cache._entries) == 2


def test_feature_cache_never_grows_beyond_its_budget():
    model, _ = _cached_and_plain()
    _losses_and_grads(model, _batch([(64, 80)]))
    one_view = model.feature_cache.bytes
    model.feature_cache.clear()
    model.feature_cache.max_bytes = one_view
    _losses_and_grads(model, _batch([(64, 80), (64, 80)]))
    assert model.feature_cache.bytes == one_view and len(model.feature_cache._entries) == 1


def test_feature_cache_keeps_checkpoint_keys_and_inference():
    model, plain = _cached_and_plain()
    assert set(model.state_dict()) == set(plain.state_dict())
    _losses_and_grads(model, _batch([(64, 80)]))
    model.eval()
    plain.eval()
    batch = _batch([(64, 80), (48, 96)], seed=1)
    with torch.no_grad():
        results, plain_results = model(batch), plain(batch)
    for result, plain_result in zip(results, plain_results):
        assert torch.equal(result["instances"].scores, plain_result["instances"].scores)
    assert model.feature_cache.hits == 0 and model.feature_cache.misses == 1
    assert len(copy.deepcopy(model).feature_cache._entries) == 0  # copies start empty


def _dataset(count, height=200, width=300):
    return [{"height": height, "width": width, "image_id": i} for i in range(count)]


def test_feature_cache_estimate_and_budget_error_name_the_key():
    cfg = _cache_cfg(MAX_MEMORY_GB=1.0)
    cfg.INPUT.MIN_SIZE_TRAIN = (384,)
    cfg.INPUT.MAX_SIZE_TRAIN = 640
    model = build_model_no_weights(cfg)
    # 384 x 576 -> res4 (stride 16) 24 x 36 x 256 channels (R18) x 4 bytes x 2 flips
    per_image = 24 * 36 * 256 * 4 * 2
    check_feature_cache(cfg, model, _dataset(int(1e9 // per_image)))
    with pytest.raises(ValueError, match="MODEL.DETR.SPEED.FEATURE_CACHE.MAX_MEMORY_GB") as error:
        check_feature_cache(cfg, model, _dataset(int(1e9 // per_image) + 1))
    assert "INPUT.MIN_SIZE_TRAIN" in str(error.value)
    cfg.INPUT.MIN_SIZE_TRAIN = (384, 416)  # two sizes: twice the views
    with pytest.raises(ValueError, match="2 sizes x 2 flips"):
        check_feature_cache(cfg, model, _dataset(int(1e9 // per_image)))


def test_feature_cache_random_crop_and_no_frozen_stage_fail_with_the_keys():
    cfg = _cache_cfg()
    cfg.INPUT.CROP.ENABLED = True
    with pytest.raises(ValueError, match="INPUT.CROP.ENABLED") as error:
        FeatureCache.from_config(cfg)
    assert "MODEL.DETR.SPEED.FEATURE_CACHE.ENABLED" in str(error.value)
    with pytest.raises(ValueError, match="MODEL.BACKBONE.FREEZE_AT"):
        build_model_no_weights(_cache_cfg(freeze_at=0))
