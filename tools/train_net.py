#!/usr/bin/env python
"""Train or evaluate DETR with Detectron2.

    python tools/train_net.py --config-file configs/detr_face_sample.yaml
    python tools/train_net.py --config-file configs/detr_r50.yaml --eval-only \
        MODEL.WEIGHTS /path/to/detr-r50-e632da11.pth
    python tools/train_net.py --config-file configs/detr_face_sample.yaml --resume
    python tools/train_net.py --config-file configs/detr_r50.yaml --num-gpus 8

Arguments after the options are config overrides (``KEY VALUE`` pairs).
"""
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from detr_d2 import add_detr_config
from detr_d2.data import register_datasets_from_cfg
from detr_d2.engine import DetrTrainer, build_checkpointer, resolve_device


def setup(args):
    """Config (DETR keys added before merging files), logging, and config-named datasets."""
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detr_d2")
    resolve_device(cfg)
    cfg.freeze()
    register_datasets_from_cfg(cfg)
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
    invoke_main()
