#!/usr/bin/env python
"""Train or evaluate DETR with Detectron2.

    python tools/train_net.py --config-file configs/detr_face_sample.yaml
    python tools/train_net.py --config-file configs/detr_r50.yaml --eval-only \
        MODEL.WEIGHTS /path/to/detr-r50-e632da11.pth
    python tools/train_net.py --config-file configs/detr_face_sample.yaml --resume
    python tools/train_net.py --config-file configs/detr_r50.yaml --num-gpus 8

Arguments after the options are config overrides (``KEY VALUE`` pairs). ``MODEL.DETR.NUM_CLASSES 0``
takes the class count from the training set's categories.
"""

import os
import sys

import detr_tools.cli as cli  # first: silences Detectron2's import-time jit warning
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from detr_d2.data import register_datasets_from_cfg
from detr_d2.engine import (
    DetrTrainer,
    build_checkpointer,
    recorded_config,
    resolve_auto_precision,
    resolve_class_layout,
    resolve_device,
    resolve_epoch_schedule,
)


def setup(args):
    """Config (DETR keys added before merging files), logging, and config-named datasets."""
    cfg = cli.load_config(args.config_file, args.opts)
    recorded = recorded_config(cfg.OUTPUT_DIR) if args.resume else None  # before it is rewritten
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detr_d2")
    resolve_device(cfg)
    resolve_auto_precision(cfg, recorded)  # recorded in config.yaml; a resume keeps the choice
    register_datasets_from_cfg(cfg)
    resolve_class_layout(cfg)  # NUM_CLASSES 0 and the class names, checked against the data
    resolve_epoch_schedule(cfg)  # SOLVER.EPOCHS into iterations of this training set
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        # default_setup wrote config.yaml before the layout and schedule were known: write them
        with PathManager.open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    cfg.freeze()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = DetrTrainer.build_model(cfg)
        build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return DetrTrainer.test(cfg, model)
    trainer = DetrTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser(epilog=__doc__).parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    sys.exit(cli.run(invoke_main))
