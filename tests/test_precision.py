"""Mixed precision (detr_d2.precision): bf16 training with fp32 matching/losses and losses
equivalent to fp32, the whole train/resume/evaluate path with every fast path on, clear precision
errors, and the CPU fallback of GPU precision settings."""

import itertools
import json

import pytest
import torch
from detectron2.utils.events import EventStorage
from detr_tools.benchmark import synthetic_batch

from detr_d2.engine import build_step_trainer, resolve_device
from detr_d2.solver import build_detr_optimizer

from helpers import INSTANT, build_model_no_weights, sample_face_opts, tiny_cfg, train_net


def one_step_losses(cfg, batch, steps):
    """Total loss of ``steps`` trainer steps on one repeated batch, from one initialisation."""
    model = build_model_no_weights(cfg).train()
    trainer = build_step_trainer(
        cfg, model, itertools.cycle([batch]), build_detr_optimizer(cfg, model)
    )
    seen_dtypes = set()
    compute = model.criterion.compute

    def spy(outputs, targets, *args, **kwargs):
        seen_dtypes.update({outputs["pred_logits"].dtype, outputs["pred_boxes"].dtype})
        seen_dtypes.add(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        )
        losses, metrics, indices = compute(outputs, targets, *args, **kwargs)
        seen_dtypes.update(v.dtype for v in losses.values())
        return losses, metrics, indices

    model.criterion.compute = spy
    totals = []
    with EventStorage(0) as storage:
        for _ in range(steps):
            trainer.run_step()
            totals.append(storage.history("total_loss").latest())
            trainer.iter += 1
            storage.iter += 1
    return totals, seen_dtypes, trainer


def test_bf16_training_losses_in_fp32_and_equivalent_to_fp32():
    batch = synthetic_batch(2, 128, 160, num_classes=3, seed=1, with_targets=True)
    cfg = tiny_cfg()
    cfg.SOLVER.BASE_LR = 5e-4
    fp32, dtypes, _ = one_step_losses(cfg, batch, steps=12)
    assert dtypes == {torch.float32}

    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "bf16"
    cfg.MODEL.DETR.SPEED.MEMORY_FORMAT = "channels_last"
    bf16, dtypes, trainer = one_step_losses(cfg, batch, steps=12)
    # the network ran under autocast, yet matching and losses saw fp32 outside autocast
    assert dtypes == {torch.float32}
    assert not trainer.grad_scaler.is_enabled()  # bf16 needs no loss scaling
    assert fp32[-1] < 0.8 * fp32[0]  # the batch is being learned
    # same weights, same batch: the curves coincide (measured: within 0.5 % at every step)
    assert bf16 == pytest.approx(fp32, rel=0.03)


def test_precision_config_errors_name_the_key():
    cfg = tiny_cfg()
    cfg.TEST.PRECISION = "fp16"
    with pytest.raises(ValueError, match=r"TEST.PRECISION='fp16' needs a GPU"):
        build_model_no_weights(cfg)
    cfg.TEST.PRECISION = "int8"
    with pytest.raises(ValueError, match="TEST.PRECISION must be 'auto' or one of"):
        build_model_no_weights(cfg)
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "fp16"
    model = build_model_no_weights(cfg)
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION='fp16' needs a GPU"):
        build_step_trainer(cfg, model, iter([]), build_detr_optimizer(cfg, model))


def test_auto_precision_is_bf16_only_where_native_and_faster(monkeypatch):
    from detr_d2 import precision

    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: True)
    for speedup, expected in ((2.0, torch.bfloat16), (1.05, torch.float32), (0.6, torch.float32)):
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda s=speedup: s)
        precision._auto_cpu_precision.cache_clear()
        assert precision.precision_dtype("auto", "TEST.PRECISION", "cpu") == expected, speedup
    precision._auto_cpu_precision.cache_clear()
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("measured"))
    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: False)
    assert precision.precision_dtype("auto", "TEST.PRECISION", "cpu") == torch.float32
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "auto"
    model = build_model_no_weights(cfg)
    trainer = build_step_trainer(cfg, model, iter([]), build_detr_optimizer(cfg, model))
    assert not hasattr(trainer, "grad_scaler")  # plain fp32 step without native bf16


def test_auto_precision_of_every_worker_follows_the_first(monkeypatch):
    """Workers measure each their own speedup; all train in the precision of worker 0's."""
    from detr_d2 import precision

    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision.comm, "get_world_size", lambda: 2)
    for first, mine, expected in ((2.0, 1.0, torch.bfloat16), (1.0, 2.0, torch.float32)):
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda m=mine: m)
        monkeypatch.setattr(precision.comm, "all_gather", lambda value, f=first: [f, value])
        precision._auto_cpu_precision.cache_clear()
        assert precision.precision_dtype("auto", "SOLVER.AMP.PRECISION", "cpu") == expected
    precision._auto_cpu_precision.cache_clear()


def test_cpu_bf16_speedup_is_measured_once_per_process():
    from detr_d2.precision import cpu_bf16_speedup

    cpu_bf16_speedup.cache_clear()
    speedup = cpu_bf16_speedup()
    assert 0.01 < speedup < 100  # a ratio of two real timings: emulated bf16 is ~8x slower
    assert cpu_bf16_speedup() == speedup and cpu_bf16_speedup.cache_info().hits == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback applies only without CUDA")
def test_gpu_config_on_cpu_falls_back_to_bf16():
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = "cuda"
    cfg.TEST.PRECISION = "fp16"
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "fp16"
    resolve_device(cfg)
    assert (cfg.MODEL.DEVICE, cfg.TEST.PRECISION, cfg.SOLVER.AMP.PRECISION) == (
        "cpu",
        "bf16",
        "bf16",
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp16_training_on_gpu_uses_a_grad_scaler():
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = "cuda"
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "fp16"
    batch = synthetic_batch(2, 128, 160, num_classes=3, seed=1, with_targets=True)
    totals, dtypes, trainer = one_step_losses(cfg, batch, steps=4)
    assert trainer.grad_scaler.is_enabled() and all(torch.isfinite(torch.tensor(totals)))
    assert dtypes == {torch.float32}


def test_train_net_bf16_fast_paths_train_resume_and_evaluate(tmp_path):
    """The whole user path with every fast path on: bf16 training (checkpointed trainer state
    included), resume, and evaluation of a bf16, folded, channels-last inference copy."""
    data = sample_face_opts(tmp_path / "faces", "faces_fast", num_train=8, num_val=4, seed=5)
    fast = [
        "SOLVER.AMP.ENABLED",
        "True",
        "SOLVER.AMP.PRECISION",
        "bf16",
        "MODEL.DETR.SPEED.MEMORY_FORMAT",
        "channels_last",
        "TEST.PRECISION",
        "bf16",
        "TEST.FOLD_BATCHNORM",
        "True",
    ]
    out = tmp_path / "run"
    log = train_net("--config-file", INSTANT, *data, *fast, "OUTPUT_DIR", out)
    assert "batch norms folded into convolutions" in log
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert "bbox/AP" in metrics[-1]
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in metrics if "total_loss" in m)
    log = train_net(
        "--config-file", INSTANT, "--resume", *data, *fast, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 6
    )
    assert "Starting training from iteration 4" in log


def test_bf16_speed_check_leaves_the_global_random_state():
    """A seeded run draws the same initial weights whether or not "auto" measured first."""
    from detr_d2.precision import cpu_bf16_speedup

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    cpu_bf16_speedup(rounds=1)
    torch.testing.assert_close(torch.rand(4), expected)


def test_fp16_loss_scaling_clips_unscaled_gradients_with_the_fused_optimizer():
    """With fp16 the scaler multiplies the loss (here by 2**16); the fused optimizer must still
    clip and step on the true gradients: the same weights as an fp32 step of the same model."""
    from detectron2.utils.events import EventStorage

    from detr_d2.engine import _DetrAMPTrainer
    from detr_d2.solver import _with_full_model_clipping

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 4)
            torch.nn.init.constant_(self.layer.weight, 0.5)

        def forward(self, batch):
            return {"loss": self.layer(batch).float().square().mean()}

    batch = torch.linspace(-1, 1, 32).view(4, 8)
    results = []
    for precision in (torch.float16, torch.float32):
        model = Linear()
        clipped = _with_full_model_clipping(torch.optim.AdamW, max_norm=0.1, norm_type=2.0)
        optimizer = clipped(model.parameters(), lr=0.1, weight_decay=0.0, fused=True)
        trainer = _DetrAMPTrainer(model, iter([batch] * 2), optimizer, precision)
        with EventStorage(0) as storage:
            trainer.iter = 0
            trainer.run_step()
            norm = storage.history("grad_norm").latest()
        results.append((model.layer.weight.detach().clone(), norm))
    (fp16_weight, fp16_norm), (fp32_weight, fp32_norm) = results
    assert abs(fp16_norm - fp32_norm) <= 0.01 * fp32_norm  # unscaled before clipping
    torch.testing.assert_close(fp16_weight, fp32_weight, atol=2e-3, rtol=0)
