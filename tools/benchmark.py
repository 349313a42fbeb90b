#!/usr/bin/env python
"""Measure DETR's speed and memory: inference, training steps, data loading, evaluation.

    python tools/benchmark.py --config-file configs/detr_r50.yaml --task inference
    python tools/benchmark.py --config-file configs/detr_r50.yaml --task inference \
        --precision bf16 MODEL.DETR.SPEED.MEMORY_FORMAT contiguous
    python tools/benchmark.py --config-file configs/detr_face_sample.yaml --task train \
        --input dataset --precision bf16
    python tools/benchmark.py --config-file configs/detr_r50.yaml --task inference \
        --backend onnxruntime --exported output/export_r50_onnx
    python tools/benchmark.py --config-file configs/detr_face_sample.yaml --task data
    python tools/benchmark.py --config-file configs/detr_face_sample.yaml --task eval \
        MODEL.WEIGHTS output/detr_face_sample/model_final.pth

Tasks: ``inference`` (images/s through the model in eval mode, post-processing included),
``train`` (s/iteration of the trainer's own step: forward, matching, losses, backward, optimizer),
``data`` (training images/s of the dataset mapper in one process, and of the loader with
``DATALOADER.NUM_WORKERS``), ``eval`` (s per evaluation of ``DATASETS.TEST[0]`` on predictions
computed beforehand). Each timing is the median over ``--iters`` runs after ``--warmup`` runs,
with quartiles and extremes. ``--input synthetic`` (default for inference/train) feeds noise
images of ``--image-size`` (default ``INPUT.MIN_SIZE_TEST`` x ``INPUT.MAX_SIZE_TEST``, the
largest test image) with random boxes; ``--input dataset`` uses the config's datasets through
DETR's mapper. The record (printed, and written to ``--output``, default
``OUTPUT_DIR/benchmark_<task>.json``) names the device, threads, precision and versions;
``--table A.json B.json ...`` prints records side by side as a markdown table.

``--compare LABEL "KEY VALUE ..."`` (repeatable; train and inference tasks) measures the config
(label ``base``) and each variant (the config with those overrides on top) in one process,
interleaved call by call, and reports each variant's median ratio to ``base`` over the rounds:
on a machine whose speed drifts, that resolves a 10 % change where separate runs do not::

    python tools/benchmark.py --config-file configs/detr_face_sample.yaml --task train \
        --input dataset --iters 20 --compare bf16_attention "MODEL.DETR.SPEED.ATTENTION_PRECISION autocast" \
        --compare nchw "MODEL.DETR.SPEED.MEMORY_FORMAT contiguous"
Arguments after the options are config overrides (``KEY VALUE`` pairs).
"""

import argparse
import json
import logging
import os
import shlex
import sys

import detr_tools.cli as cli  # first: silences Detectron2's import-time jit warning
import torch
from detr_tools.benchmark import (
    TASKS,
    compare_interleaved,
    comparison_table,
    markdown_table,
    run_benchmark,
)

from detr_d2.data import register_datasets_from_cfg
from detr_d2.engine import resolve_device
from detr_d2.export import BACKENDS, exported_model
from detr_d2.predictor import DetrPredictor

logger = logging.getLogger("detr_tools.benchmark")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", help="a detr_d2 YAML config")
    parser.add_argument("--task", choices=TASKS)
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="instead of measuring: print a markdown table of these records",
    )
    parser.add_argument(
        "--weights", help="checkpoint to load (MODEL.WEIGHTS); default: random init"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pytorch",
        help="inference/eval: the PyTorch model or an export (see --exported)",
    )
    parser.add_argument("--exported", help="export folder of tools/export_model.py (--backend)")
    parser.add_argument(
        "--input",
        choices=("synthetic", "dataset"),
        default="synthetic",
        help="inference/train inputs (data/eval always use the datasets)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="synthetic input size (default: MIN_SIZE_TEST MAX_SIZE_TEST)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="images per call (default: 1 for inference, SOLVER.IMS_PER_BATCH for train)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="sets TEST.PRECISION (inference) or SOLVER.AMP (train)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--iters", type=int, default=10, help="timed runs (default 10)")
    parser.add_argument(
        "--loader-batches",
        type=int,
        default=20,
        help="data task: batches drawn from the loader (default 20)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        action="append",
        metavar=("LABEL", "OVERRIDES"),
        help='train/inference: also measure the config with these overrides ("KEY VALUE ..."), '
        "interleaved with it in one process (repeatable)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--label", default="", help="free text stored in the record")
    parser.add_argument("--output", help="JSON file (default OUTPUT_DIR/benchmark_<task>.json)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if not args.table and not (args.config_file and args.task):
        parser.error("--config-file and --task are required (or --table to summarise records)")
    return args


def setup(args: argparse.Namespace, extra_opts: list[str] = ()):
    cfg = cli.load_config(args.config_file, [*args.opts, *extra_opts])
    if args.weights:
        cfg.MODEL.WEIGHTS = args.weights
    if args.precision:
        if args.task == "train":
            cfg.SOLVER.AMP.ENABLED = args.precision != "fp32"
            cfg.SOLVER.AMP.PRECISION = args.precision
        else:
            cfg.TEST.PRECISION = args.precision
    resolve_device(cfg)
    cfg.freeze()
    register_datasets_from_cfg(cfg)
    return cfg


def load_model(cfg) -> torch.nn.Module:
    """The model as every tool loads it (:class:`DetrPredictor`); random weights without any."""
    return DetrPredictor(cfg, load_weights=bool(cfg.MODEL.WEIGHTS)).model


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.table:
        records = []
        for path in args.table:
            with open(path) as f:
                records.append(json.load(f))
        single = [r for r in records if r.get("mode") != "interleaved"]
        if single:
            print(markdown_table(single))
        for record in records:  # interleaved comparisons: a table each, with where and when
            if record.get("mode") == "interleaved":
                print(f"\n{record.get('device_name', '?')}, {record.get('date', '?')}:\n")
                print(comparison_table(record))
        return None
    cli.setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup(args)
    output = args.output or os.path.join(cfg.OUTPUT_DIR, f"benchmark_{args.task}.json")
    if args.backend != "pytorch" and (args.compare or args.task not in ("inference", "eval")):
        raise ValueError(
            f"--backend {args.backend} measures the inference and eval tasks only, without "
            "--compare."
        )
    if args.compare:
        variants = {"base": cfg}
        for label, overrides in args.compare:
            if label in variants:
                raise ValueError(f"--compare label {label!r} is used twice.")
            variants[label] = setup(args, shlex.split(overrides))
        record = compare_interleaved(
            variants,
            args.task,
            build_model=load_model,
            input_source=args.input,
            batch_size=args.batch_size,
            image_size=tuple(args.image_size) if args.image_size else None,
            warmup=args.warmup,
            iters=args.iters,
        )
        record["compare"] = {label: shlex.split(o) for label, o in args.compare}
    else:
        record = run_benchmark(
            cfg,
            args.task,
            build_model=load_model
            if args.backend == "pytorch"
            else (lambda cfg: exported_model(cfg, args.backend, args.exported)),
            input_source=args.input,
            batch_size=args.batch_size,
            image_size=tuple(args.image_size) if args.image_size else None,
            warmup=args.warmup,
            iters=args.iters,
            loader_batches=args.loader_batches,
            output_dir=os.path.join(cfg.OUTPUT_DIR, "benchmark_eval"),
        )
    record.update(
        config_file=args.config_file,
        opts=args.opts,
        label=args.label,
        command=sys.argv,
        backend=args.backend,
    )
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))
    if args.compare:
        print(comparison_table(record))
    logger.info(f"Benchmark record written to {output}")
    return record


if __name__ == "__main__":
    sys.exit(cli.run(main))
