import pytest
import torch
from detectron2.modeling import build_model

from detr_d2 import solver
from detr_d2.solver import build_detr_optimizer

from helpers import tiny_cfg


def test_param_groups_backbone_multiplier_and_frozen_left_out():
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER = 1e-4, 0.1
    model = build_model(cfg)
    optimizer = build_detr_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in lr_of, f"frozen {name} given to the optimizer"
        elif name.startswith("backbone."):
            assert lr_of[id(param)] == pytest.approx(1e-5), name
        else:
            assert lr_of[id(param)] == pytest.approx(1e-4), name
    assert not any(
        n.startswith("backbone.res2.") and p.requires_grad for n, p in model.named_parameters()
    )


def test_full_model_gradient_clipping():
    """The global norm over all parameters is clipped to CLIP_VALUE before the update."""
    cfg = tiny_cfg()
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0, 1.0
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    model = torch.nn.Module()
    model.a, model.b = a, b
    optimizer = build_detr_optimizer(cfg, model)
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)  # global norm sqrt(27 + 64)
    optimizer.step()
    step = torch.cat([a.detach(), b.detach()])
    assert step.norm().item() == pytest.approx(0.1, rel=1e-5)
    assert (step[:3] / step[3:4]).tolist() == pytest.approx([0.75] * 3)  # direction kept


def test_unknown_optimizer_and_clip_type_rejected():
    cfg = tiny_cfg()
    model = build_model(cfg)
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_detr_optimizer(cfg, model)
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    with pytest.raises(ValueError, match="CLIP_TYPE"):
        build_detr_optimizer(cfg, model)


def test_grad_norm_logged_inside_training():
    from detectron2.utils.events import EventStorage

    cfg = tiny_cfg()
    param = torch.nn.Parameter(torch.zeros(2))
    model = torch.nn.Module()
    model.p = param
    optimizer = build_detr_optimizer(cfg, model)
    param.grad = torch.tensor([3.0, 4.0])
    with EventStorage() as storage:
        optimizer.step()
    assert storage.history("grad_norm").latest() == pytest.approx(5.0)


def test_non_finite_loss_stops_before_the_step_and_names_the_term():
    from detectron2.utils.events import EventStorage

    from detr_d2.engine import _DetrSimpleTrainer

    class Diverged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, data):
            return {"loss_ce": self.w.sum(), "loss_giou_3": self.w.sum() * float("nan")}

    model = Diverged()
    trainer = _DetrSimpleTrainer(model, [[{}]] * 3, torch.optim.SGD(model.parameters(), lr=1.0))
    trainer.iter = 41
    with (
        EventStorage(41),
        pytest.raises(FloatingPointError, match=r"iteration 41: loss_giou_3=nan"),
    ):
        trainer.run_step()
    assert model.w.item() == 1.0  # the optimizer did not step


def test_fused_optimizer_gives_the_same_updates(monkeypatch):
    """The optimizer is PyTorch's fused AdamW (SGD too) wherever PyTorch has it, full-model
    clipping kept: the same weights as the per-parameter loop after several steps (up to float
    rounding)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    models = [build_model(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_detr_optimizer(cfg, models[1])
    assert fused.defaults["fused"]
    cfg.SOLVER.OPTIMIZER = "SGD"
    assert build_detr_optimizer(cfg, models[1]).defaults["fused"]
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    monkeypatch.setattr(solver, "_fused_update_exists", lambda *_: False)
    looped = build_detr_optimizer(cfg, models[0])
    assert not looped.defaults.get("fused")
    optimizers = [looped, fused]
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in models[0].named_parameters() if p.requires_grad}
        for model, optimizer in zip(models, optimizers):
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.grad = grads[name].clone()
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
