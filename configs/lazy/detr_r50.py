"""DETR R50 on COCO 2017 as a Detectron2 LazyConfig: the model of ``configs/detr_r50.yaml``
(tested to be the same), the official optimizer and schedule, and DETR's data loaders.

    python -c "from detectron2.config import LazyConfig, instantiate; \
        model = instantiate(LazyConfig.load('configs/lazy/detr_r50.py').model)"
    python detectron2/tools/lazyconfig_train_net.py --config-file configs/lazy/detr_r50.py \
        train.init_checkpoint=/path/to/detr-r50-e632da11.pth   # official files load as with YAML

Import ``detr_d2`` before instantiating (this file does), so that official checkpoints are
converted on load. Values are those of ``configs/Base-DETR.yaml``; the official recipe's numbers
are explained there and in ``detr_d2/config.py``.
"""

import torch
from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from detr_d2.data import DetrDatasetMapper
from detr_d2.data.augmentation import detr_augmentations
from detr_d2.layout import official_coco_layout
from detr_d2.modeling import Detr, HungarianMatcher, SetCriterion, Transformer
from detr_d2.modeling.criterion import build_weight_dict
from detr_d2.modeling.position_encoding import PositionEmbeddingSine
from detr_d2.precision import attention_in_fp32, use_channels_last
from detr_d2.solver import clipped_adamw, detr_param_groups

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

model = L(Detr)(
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res5"],
        freeze_at=2,
    ),
    in_feature="res5",
    position_embedding=L(PositionEmbeddingSine)(num_pos_feats=128, normalize=True),  # C / 2
    transformer=L(Transformer)(
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
        normalize_before=False,
        return_intermediate_dec="${..aux_loss}",
        # MODEL.DETR.SPEED.ATTENTION_PRECISION "auto"
        attention_fp32=L(attention_in_fp32)(setting="auto", device=DEVICE),
    ),
    num_classes=80,
    num_queries=100,
    aux_loss=True,
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0),
        weight_dict=L(build_weight_dict)(
            base={"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}, num_aux_layers=5
        ),
        eos_coef=0.1,
    ),
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    class_layout=L(official_coco_layout)(num_classes="${..num_classes}"),
    # MODEL.DETR.SPEED.MEMORY_FORMAT "auto"
    channels_last=L(use_channels_last)(setting="auto", device=DEVICE),
)

# lazyconfig_train_net.py sets optimizer.params.model
optimizer = L(clipped_adamw)(
    params=L(detr_param_groups)(
        base_lr="${..lr}", weight_decay=1e-4, weight_decay_norm=1e-4, backbone_multiplier=0.1
    ),
    lr=1e-4,
    weight_decay=1e-4,
    max_norm=0.1,
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(detr_augmentations)(
            is_train=True,
            min_size=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
            max_size=1333,
            crop_pre_resize=[400, 500, 600],
            crop_size=[384, 600],
        ),
        image_format="RGB",
    ),
    total_batch_size=64,
    aspect_ratio_grouping=False,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=L(detr_augmentations)(is_train=False, min_size=[800], max_size=1333),
        image_format="RGB",
    ),
    num_workers=4,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")

# 500 epochs at batch 64 (1848 iterations each), LR x0.1 after 400; no warm-up
train = dict(
    output_dir="./output/detr_r50_lazy",
    init_checkpoint="",
    max_iter=924000,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=0,
    log_period=20,
    device=DEVICE,
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[739200, 924000]),
    warmup_length=0.0,
    warmup_factor=1.0,
)
