#!/usr/bin/env python
"""Time our DETR's fp32 CPU training step against Hugging Face transformers' DETR, side by side.

    python tools/benchmark_peer.py --peer-path /work/hf_side --rounds 10
    DETR_PEER_PATH=/work/hf_side python tools/benchmark_peer.py --threads 4 \
        --image-size 800 1066 --output output/benchmark_peer_800.json

Both models are the architecture of ``--config-file`` (default ``configs/detr_r50.yaml``, with
``--num-classes`` 91 as the official COCO head) and hold the same weights: ours, randomly
initialised, copied into ``DetrForObjectDetection`` and checked in eval mode on one image (the
max differences of logits and boxes are logged and recorded). Each step, on the same synthetic
batch: forward with the loss (each model's own matcher and criterion), backward, gradient norm
clipping, AdamW (backbone at a tenth of the learning rate, stem and first stage frozen). Ours is
the trainer's own step (as ``tools/benchmark.py --task train``); HF's the official loop's.
Steps alternate, ``--warmup`` untimed of each first, then ``--rounds`` timed rounds; the record
(printed, and written to ``--output``, default ``OUTPUT_DIR/benchmark_peer.json``) holds each
model's median and quartiles, the median per-round ratio ours/HF, every round's times, the CPU,
the versions and the commit.

transformers is not installed with detr_d2: install it into a side folder, which
``--peer-path`` (default: ``$DETR_PEER_PATH``) adds to the end of ``sys.path``::

    pip install --target /work/hf_side --no-deps transformers huggingface_hub tokenizers \
        safetensors regex httpx2 httpcore2 anyio idna truststore h11

Nothing is downloaded (``HF_HUB_OFFLINE=1``). Arguments after the options are config
overrides (``KEY VALUE`` pairs).
"""

import argparse
import json
import logging
import os
import sys

import detr_tools.cli as cli  # first: silences Detectron2's import-time jit warning
import torch
from detectron2.utils.logger import setup_logger
from detr_tools.benchmark import comparison_table
from detr_tools.peer_benchmark import PEER_PATH_ENV, import_transformers, run_peer_benchmark

from detr_d2.engine import resolve_device
from detr_d2.predictor import DetrPredictor

logger = logging.getLogger("detr_tools.peer_benchmark")

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "detr_r50.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config-file", default=DEFAULT_CONFIG, help="a detr_d2 YAML config (default: R50)"
    )
    parser.add_argument(
        "--peer-path",
        default=os.environ.get(PEER_PATH_ENV),
        help=f"folder holding transformers (default: ${PEER_PATH_ENV})",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=91,
        help="MODEL.DETR.NUM_CLASSES (default 91: the official COCO head, 92 logits)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=(512, 683),
        metavar=("H", "W"),
        help="synthetic image size (default 512 683)",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each (default 2)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch (default 0)")
    parser.add_argument("--label", default="", help="free text stored in the record")
    parser.add_argument("--output", help="JSON file (default OUTPUT_DIR/benchmark_peer.json)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cli.setup_logging()
    setup_logger(name="detr_tools.peer_benchmark")  # the weights check and the record's path
    transformers = import_transformers(args.peer_path)  # fails before anything is built
    torch.set_num_threads(args.threads)
    opts = ["MODEL.DETR.NUM_CLASSES", str(args.num_classes), *args.opts]
    cfg = cli.load_config(args.config_file, opts)
    cfg.MODEL.DEVICE = "cpu"  # an fp32 CPU comparison, whatever the config targets
    cfg.SOLVER.AMP.ENABLED = False
    resolve_device(cfg)
    cfg.freeze()
    record = run_peer_benchmark(
        cfg,
        transformers,
        build_model=lambda cfg: DetrPredictor(cfg, load_weights=bool(cfg.MODEL.WEIGHTS)).model,
        batch_size=args.batch_size,
        image_size=tuple(args.image_size),
        warmup=args.warmup,
        rounds=args.rounds,
        seed=args.seed,
    )
    record.update(
        config_file=args.config_file,
        opts=opts,
        label=args.label,
        command=sys.argv,
        peer_path=args.peer_path,
    )
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "benchmark_peer.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))
    print(comparison_table(record))
    logger.info(f"Benchmark record written to {output}")
    return record


if __name__ == "__main__":
    sys.exit(cli.run(main))
