"""A frozen backbone trains through a copy with folded batch norms: same losses and gradients
(up to float rounding), same checkpoint keys, rebuilt when the weights change."""

import copy

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from detr_d2.modeling.frozen_backbone import has_foldable_frozen_part

from helpers import build_model_no_weights, tiny_cfg


def _batch():
    generator = torch.Generator().manual_seed(0)
    batch = []
    for h, w in ((64, 80), (72, 56)):
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 40.0, 50.0]]))
        instances.gt_classes = torch.tensor([1])
        image = torch.randint(0, 255, (3, h, w), generator=generator).float()
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


def _frozen_model(freeze_at=5):
    cfg = tiny_cfg()
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


def _losses_and_grads(model):
    model.zero_grad()
    with EventStorage():
        losses = model(_batch())
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
