"""Fast paths keep outputs correct: batch-norm folding and channels-last within the fp32 parity
tolerances of the official implementation, bf16 inference within stated bf16 tolerances, bf16
training with fp32 matching/losses and losses equivalent to fp32, clear precision errors."""
import copy
import itertools
import json
import logging

import pytest
import torch
from detectron2.utils.events import EventStorage

from helpers import (
    CONFIGS,
    INSTANT,
    build_model_no_weights,
    cfg_for_manifest,
    load_reference,
    load_tool,
    make_upstream_checkpoint,
    reference_inputs,
    sample_face_opts,
    tiny_cfg,
    train_net,
)
from detr_d2.dev.benchmark import synthetic_batch
from detr_d2.engine import build_checkpointer, build_step_trainer, resolve_device, resolve_num_workers
from detr_d2.modeling.inference_graph import fold_batchnorm, inference_model
from detr_d2.solver import build_detr_optimizer


def reference_run(variant, directory, opts):
    """Official-checkpoint model of a fixture variant, built with config ``opts`` and made
    ready for inference the way the tools do (checkpointer, then ``inference_model``)."""
    expected, manifest = load_reference(variant)
    cfg = cfg_for_manifest(manifest["model"], masks=True)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = str(make_upstream_checkpoint(manifest, expected["args"]["seed"], directory / "up.pth"))
    model = build_model_no_weights(cfg)
    build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model = inference_model(model.eval(), cfg)
    return expected, model.predict_raw(reference_inputs(expected))


@pytest.mark.parametrize("variant", ["r50", "r50_dc5", "r50_panoptic"])
def test_folded_channels_last_fp32_keeps_parity(variant, tmp_path):
    opts = ["TEST.FOLD_BATCHNORM", "True", "MODEL.DETR.CHANNELS_LAST", "True"]
    expected, raw = reference_run(variant, tmp_path, opts)
    reference = expected["outputs"]
    for key in ("pred_logits", "pred_boxes"):
        diff = (raw[key] - reference[key]).abs().max().item()
        assert diff <= 1e-4, f"{key}: {diff:.3g}"  # the fp32 parity tolerance
    for ours, theirs in zip(raw["aux_outputs"], reference["aux_outputs"]):
        assert (ours["pred_logits"] - theirs["pred_logits"]).abs().max() <= 1e-4
    if "pred_masks" in reference:  # the mask head reads channels-last backbone features
        masks = raw["pred_masks"][:, : reference["pred_masks"].shape[1]]
        assert (masks - reference["pred_masks"]).abs().max() <= 1e-3  # test_panoptic_parity's bound


@pytest.mark.parametrize("variant", ["r50", "r50_dc5"])
def test_bf16_inference_agrees_with_official_fp32(variant, tmp_path):
    """bf16 keeps ~3 significant digits: measured on these fixtures, logits move by <= 0.13,
    probabilities by <= 0.007, boxes by <= 0.019 (of the image size), top classes agree on
    99-100 % of the queries (the others are near-ties of random-weight logits)."""
    opts = ["TEST.PRECISION", "bf16", "TEST.FOLD_BATCHNORM", "True", "MODEL.DETR.CHANNELS_LAST", "True"]
    expected, raw = reference_run(variant, tmp_path, opts)
    reference = expected["outputs"]
    assert raw["pred_logits"].dtype == torch.float32  # post-processing always sees fp32
    top_agree = (raw["pred_logits"].argmax(-1) == reference["pred_logits"].argmax(-1)).float().mean()
    prob_diff = (raw["pred_logits"].softmax(-1) - reference["pred_logits"].softmax(-1)).abs()
    box_diff = (raw["pred_boxes"] - reference["pred_boxes"]).abs()
    logging.getLogger(__name__).info(
        f"{variant} bf16: top-class agreement {top_agree:.4f}, max prob diff {prob_diff.max():.3g}, "
        f"box diff max {box_diff.max():.3g} mean {box_diff.mean():.3g}"
    )
    assert top_agree >= 0.97
    assert prob_diff.max() <= 0.02
    assert box_diff.max() <= 0.04 and box_diff.mean() <= 0.005


def test_fold_batchnorm_with_batch_statistics_of_a_trained_model():
    """Real batch norms (the sample config trains them) fold exactly, in a copy only."""
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.TEST.FOLD_BATCHNORM = True
    model = build_model_no_weights(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # statistics and affine parameters as after training
        for tensor, low, high in ((norm.running_mean, -1, 1), (norm.running_var, 0.2, 3), (norm.weight.data, 0.5, 1.5), (norm.bias.data, -1, 1)):
            tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))
    keys_before = set(model.state_dict())
    inputs = synthetic_batch(2, 96, 128, num_classes=3, seed=0, with_targets=False)
    expected = model.predict_raw(inputs)

    folded = inference_model(model, cfg)
    assert folded is not model and set(model.state_dict()) == keys_before
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    actual = folded.predict_raw(inputs)
    for key in ("pred_logits", "pred_boxes"):
        assert (actual[key] - expected[key]).abs().max() <= 1e-4

    with pytest.raises(RuntimeError, match="eval mode"):
        fold_batchnorm(copy.deepcopy(model).train())
    assert fold_batchnorm(copy.deepcopy(model)) == len(norms)


def one_step_losses(cfg, batch, steps):
    """Total loss of ``steps`` trainer steps on one repeated batch, from one initialisation."""
    model = build_model_no_weights(cfg).train()
    trainer = build_step_trainer(cfg, model, itertools.cycle([batch]), build_detr_optimizer(cfg, model))
    seen_dtypes = set()
    compute = model.criterion.compute

    def spy(outputs, targets, *args, **kwargs):
        seen_dtypes.update({outputs["pred_logits"].dtype, outputs["pred_boxes"].dtype})
        seen_dtypes.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
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
    cfg.MODEL.DETR.CHANNELS_LAST = True
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


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    from detr_d2 import precision

    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: True)
    assert precision.precision_dtype("auto", "TEST.PRECISION", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: False)
    assert precision.precision_dtype("auto", "TEST.PRECISION", "cpu") == torch.float32
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "auto"
    model = build_model_no_weights(cfg)
    trainer = build_step_trainer(cfg, model, iter([]), build_detr_optimizer(cfg, model))
    assert not hasattr(trainer, "grad_scaler")  # plain fp32 step without native bf16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback applies only without CUDA")
def test_gpu_config_on_cpu_falls_back_to_bf16():
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = "cuda"
    cfg.TEST.PRECISION = "fp16"
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "fp16"
    resolve_device(cfg)
    assert (cfg.MODEL.DEVICE, cfg.TEST.PRECISION, cfg.SOLVER.AMP.PRECISION) == ("cpu", "bf16", "bf16")


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
        "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bf16", "MODEL.DETR.CHANNELS_LAST", "True",
        "TEST.PRECISION", "bf16", "TEST.FOLD_BATCHNORM", "True",
    ]
    out = tmp_path / "run"
    log = train_net("--config-file", INSTANT, *data, *fast, "OUTPUT_DIR", out)
    assert "batch norms folded into convolutions" in log
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert "bbox/AP" in metrics[-1]
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in metrics if "total_loss" in m)
    log = train_net("--config-file", INSTANT, "--resume", *data, *fast, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 6)
    assert "Starting training from iteration 4" in log


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    return sample_face_opts(tmp_path_factory.mktemp("faces"), "faces_bench", num_train=8, num_val=4, seed=6)


@pytest.mark.parametrize("task", ["inference", "train", "data", "eval"])
def test_benchmark_tool_writes_a_complete_record(task, bench_data, tmp_path, capsys):
    data = bench_data
    benchmark = load_tool("benchmark")
    output = tmp_path / f"{task}.json"
    args = [
        "--config-file", str(CONFIGS / "quick_schedules" / "detr_face_sample_instant_test.yaml"),
        "--task", task, "--warmup", "1", "--iters", "2", "--loader-batches", "2",
        "--output", str(output), "--input", "dataset" if task == "train" else "synthetic",
        *data, "OUTPUT_DIR", str(tmp_path / "out"),
    ]
    if task == "inference":
        args[-2:-2] = ["TEST.PRECISION", "bf16"]
    benchmark.main(args)
    record = json.loads(output.read_text())
    for key in ("device", "device_name", "torch_threads", "torch", "detectron2", "test_precision", "peak_rss_mib"):
        assert key in record, key
    if task == "data":
        assert record["mapper_one_worker"]["images_per_second"] > 0
        assert record["loader"]["images_per_second"] > 0
    else:
        assert record["timed_calls"] == 2 and record["images_per_second"] > 0
        assert record["seconds_p25"] <= record["seconds_median"] <= record["seconds_p75"]
    if task == "inference":
        assert record["test_precision"] == "bf16" and record["batch_size"] == 1
    if task == "train":
        assert record["batch_size"] > 0 and len(record["total_loss_first_last"]) == 2
    if task == "eval":
        assert record["images"] == 4 and "AP" in record["results"]["bbox"]
    benchmark.main(["--table", str(output)])
    table = capsys.readouterr().out.strip().splitlines()[-3:]
    assert table[0].startswith("| record | task") and f"| {task} |" in table[2]


def test_num_workers_auto_by_device():
    cfg = tiny_cfg()
    cfg.DATALOADER.NUM_WORKERS = 3
    assert resolve_num_workers(cfg) == 3
    cfg.DATALOADER.NUM_WORKERS = -1
    assert resolve_num_workers(cfg) == 1  # CPU training keeps its cores for the model
    cfg.MODEL.DEVICE = "cuda"
    assert 1 <= resolve_num_workers(cfg) <= 4


def test_compiled_inference_model_matches_eager():
    """``TEST.COMPILE`` (off by default: measured no gain on CPU, docs/benchmarks.md) compiles
    the inference copy only and keeps its outputs."""
    cfg = tiny_cfg()
    cfg.TEST.COMPILE = True
    model = build_model_no_weights(cfg).eval()
    inputs = synthetic_batch(1, 64, 96, num_classes=3, seed=2, with_targets=False)
    expected = model.predict_raw(inputs)
    compiled = inference_model(model, cfg)
    assert compiled is not model and not isinstance(model.backbone, torch._dynamo.eval_frame.OptimizedModule)
    actual = compiled.predict_raw(inputs)
    for key in ("pred_logits", "pred_boxes"):
        assert (actual[key] - expected[key]).abs().max() <= 1e-4
