"""Config keys of detr_d2, added to a Detectron2 ``CfgNode`` by :func:`add_detr_config`, and
:func:`merge_detr_config_file`, which also reads the YAML files of an earlier release."""

import logging

from detectron2.config import CfgNode as CN

logger = logging.getLogger(__name__)


def add_detr_config(cfg: CN) -> None:
    """Add every DETR hyper-parameter to ``cfg`` (defaults = the official DETR R50 recipe)."""
    cfg.MODEL.DETR = CN()
    # Backbone output fed to the transformer (the last, stride-32 or DC5 stride-16 map).
    cfg.MODEL.DETR.IN_FEATURE = "res5"
    # Number of object classes K; the head predicts K + 1 logits, the last one is "no object".
    # 0: the training set's categories (those its annotations use), logged at start.
    cfg.MODEL.DETR.NUM_CLASSES = 80
    # Class layout (detr_d2/layout.py), one entry per class; empty: from the registered datasets
    # of DATASETS.TEST/TRAIN, else the official COCO layouts (80, 91, 133, 250 classes).
    # Name of each class, as drawn and written by tools/predict.py.
    cfg.MODEL.DETR.CLASS_NAMES = []
    # True for a thing (instances), False for stuff (panoptic only); needed by MASK_ON models.
    cfg.MODEL.DETR.CLASS_IS_THING = []
    # Dataset category id of each class: the row of an official (COCO-id indexed) head it takes.
    cfg.MODEL.DETR.CLASS_DATASET_IDS = []
    # Number of object queries N (paper Sec. 3.2); official checkpoints use 100.
    cfg.MODEL.DETR.NUM_OBJECT_QUERIES = 100
    # Transformer width d (paper Sec. 3.2).
    cfg.MODEL.DETR.HIDDEN_DIM = 256
    # Attention heads M in every multi-head attention.
    cfg.MODEL.DETR.NHEADS = 8
    # Number of encoder layers.
    cfg.MODEL.DETR.ENC_LAYERS = 6
    # Number of decoder layers.
    cfg.MODEL.DETR.DEC_LAYERS = 6
    # Hidden size of the feed-forward network in each transformer layer.
    cfg.MODEL.DETR.DIM_FEEDFORWARD = 2048
    # Dropout in the transformer (off in eval mode).
    cfg.MODEL.DETR.DROPOUT = 0.1
    # LayerNorm before attention/FFN instead of after (official default: post-norm, False).
    cfg.MODEL.DETR.PRE_NORM = False
    # Spatial position encoding: "sine" (official, parameter-free) or "learned" (50x50 table).
    cfg.MODEL.DETR.POSITION_EMBEDDING = "sine"

    # Hungarian matcher (paper Eq. 1 and 2): costs of the class probability, L1 box and GIoU.
    cfg.MODEL.DETR.MATCHER = CN()
    cfg.MODEL.DETR.MATCHER.COST_CLASS = 1.0
    cfg.MODEL.DETR.MATCHER.COST_BBOX = 5.0
    cfg.MODEL.DETR.MATCHER.COST_GIOU = 2.0

    # Set-prediction loss (detr_d2/modeling/criterion.py).
    cfg.MODEL.DETR.LOSS = CN()
    # Auxiliary decoding losses after every decoder layer (paper Sec. 3.2, "deep supervision").
    cfg.MODEL.DETR.LOSS.DEEP_SUPERVISION = True
    # Weights of cross-entropy, L1 box (lambda_L1) and GIoU (lambda_iou) of paper Eq. 2.
    cfg.MODEL.DETR.LOSS.CLASS_WEIGHT = 1.0
    cfg.MODEL.DETR.LOSS.L1_WEIGHT = 5.0
    cfg.MODEL.DETR.LOSS.GIOU_WEIGHT = 2.0
    # Down-weighting of the "no object" class in the cross-entropy (paper Sec. 3.1: factor 10).
    cfg.MODEL.DETR.LOSS.NO_OBJECT_WEIGHT = 0.1
    # Classification loss: "softmax" (official cross-entropy with "no object"), "focal" (sigmoid
    # focal loss, Deformable DETR) or "ia_bce" (IoU-aware BCE, Align-DETR / RF-DETR). The sigmoid
    # losses also switch the matching cost to the focal cost and inference scores to the sigmoid;
    # keep "softmax" for official checkpoints' class heads unless you fine-tune the head anew.
    cfg.MODEL.DETR.LOSS.CLASS_LOSS = "softmax"
    # alpha and gamma of the focal loss / focal matching cost (Lin et al. 2017 defaults).
    cfg.MODEL.DETR.LOSS.FOCAL_ALPHA = 0.25
    cfg.MODEL.DETR.LOSS.FOCAL_GAMMA = 2.0
    # With MODEL.MASK_ON: weights of the sigmoid focal mask loss (loss_mask, alpha 0.25, gamma 2)
    # and of the Dice loss (loss_dice); official: 1 and 1.
    cfg.MODEL.DETR.LOSS.MASK_WEIGHT = 1.0
    cfg.MODEL.DETR.LOSS.DICE_WEIGHT = 1.0

    # Training-only convergence aids (docs/training_aids.md): the inference model, its checkpoint
    # keys and its outputs are those of plain DETR.
    cfg.MODEL.DETR.TRAINING_AIDS = CN()
    # Group DETR: G query groups in training (group 0 = the plain queries, used at inference),
    # each matched one-to-one, self-attention masked across groups. 1 = plain DETR.
    cfg.MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS = 1
    # H-DETR hybrid matching: a training-only query set matched to the targets repeated REPEAT
    # times (one-to-many), its loss weighted by WEIGHT. NUM_QUERIES 0 = off.
    cfg.MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY = CN()
    cfg.MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.NUM_QUERIES = 0
    cfg.MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.REPEAT = 6
    cfg.MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.WEIGHT = 1.0
    # DN-DETR denoising queries: GROUPS copies of the ground truth, boxes jittered by up to
    # BOX_NOISE of their size and labels flipped with probability LABEL_NOISE, enter the decoder
    # through a training-only encoder of box and label; each copy is trained to reconstruct its
    # boxes, no matching involved. Self-attention keeps them apart from the matching queries and
    # from each other. Losses weighted by WEIGHT. GROUPS 0 = off. The noise is drawn from each
    # process's RNG (like dropout): exact on resume, not equal between 1 and 2 processes.
    cfg.MODEL.DETR.TRAINING_AIDS.DENOISING = CN()
    cfg.MODEL.DETR.TRAINING_AIDS.DENOISING.GROUPS = 0
    cfg.MODEL.DETR.TRAINING_AIDS.DENOISING.BOX_NOISE = 0.4
    cfg.MODEL.DETR.TRAINING_AIDS.DENOISING.LABEL_NOISE = 0.2
    cfg.MODEL.DETR.TRAINING_AIDS.DENOISING.WEIGHT = 1.0
    # Dense auxiliary head (Co-DETR style, FCOS-like) on the encoder output: focal class loss and
    # GIoU box loss at every location near an object centre, weighted by WEIGHT.
    cfg.MODEL.DETR.TRAINING_AIDS.DENSE_AUX = CN()
    cfg.MODEL.DETR.TRAINING_AIDS.DENSE_AUX.ENABLED = False
    cfg.MODEL.DETR.TRAINING_AIDS.DENSE_AUX.WEIGHT = 1.0

    # Starting from a checkpoint of other classes or another query count (fine-tuning,
    # detr_d2/finetune.py). Applied only when the checkpoint's classes or queries differ from the
    # model's: resuming and predicting with the fine-tuned model load it as it is.
    cfg.MODEL.DETR.INIT = CN()
    # For each class of the model, in its class order, the checkpoint class whose class-head row
    # it starts from, e.g. ["person"] for a face dataset fine-tuned from COCO; "" = a fresh row.
    # The checkpoint's "no object" row is kept. Empty: classes that are COCO categories of an
    # official head (same id and name) take their rows, the others start fresh.
    cfg.MODEL.DETR.INIT.CLASSES_FROM = []
    # NUM_OBJECT_QUERIES below the checkpoint's: keep the "first" of its queries, a "spread"
    # subset (farthest-point choice of the embeddings: no better on the offline stand-in), or
    # re-initialise them all ("random"). Above it: all the checkpoint's queries are kept and the
    # rest start fresh.
    cfg.MODEL.DETR.INIT.QUERIES = "first"
    # False: a checkpoint of another architecture, or with tensors missing, unused or of another
    # shape beyond the class head and queries, stops the load naming them. True: load what fits
    # (e.g. backbone-only weights such as an ImageNet ResNet); the rest starts fresh.
    cfg.MODEL.DETR.INIT.PARTIAL = False

    # Segmentation: MODEL.MASK_ON (Detectron2's key) adds DETR's mask head (paper Sec. 4.4).
    # Train only the mask head; backbone, transformer and box/class heads are frozen (official
    # second panoptic stage, --frozen_weights: load the stage-1 model through MODEL.WEIGHTS).
    cfg.MODEL.DETR.FREEZE_DETR = False

    cfg.MODEL.DETR.TEST = CN()
    # Return "instances" (boxes; with MASK_ON also full-resolution pred_masks; thing classes only).
    cfg.MODEL.DETR.TEST.INSTANCE_ON = True
    # Return "sem_seg", per-class scores [K, H, W] (needs MASK_ON).
    cfg.MODEL.DETR.TEST.SEMANTIC_ON = False
    # Return "panoptic_seg", (segment id map, segments_info) (needs MASK_ON).
    cfg.MODEL.DETR.TEST.PANOPTIC_ON = False
    # Class probability a query needs to enter the panoptic output (official PostProcessPanoptic).
    cfg.MODEL.DETR.TEST.PANOPTIC_THRESHOLD = 0.85
    # Threshold on the sigmoid mask probability of binary instance masks (official PostProcessSegm).
    cfg.MODEL.DETR.TEST.MASK_THRESHOLD = 0.5

    # Speed (docs/benchmarks.md): switches that only change how fast the same model runs.
    cfg.MODEL.DETR.SPEED = CN()
    # Memory format of the backbone's weights and activations, in training and inference:
    # "channels_last" (NHWC: faster oneDNN and tensor-core cuDNN convolutions), "contiguous"
    # (NCHW) or "auto" (channels_last on CPUs and on GPUs with tensor cores, else contiguous).
    cfg.MODEL.DETR.SPEED.MEMORY_FORMAT = "auto"
    # Precision of the transformer's attention inside bf16/fp16 autocast: "fp32", "autocast"
    # (the autocast dtype) or "auto" (fp32 on CPUs without AMX, where PyTorch's bf16
    # flash-attention kernel, backward above all, is 1.5-6x slower than its fp32 kernel at
    # DETR's sizes; autocast elsewhere). No effect on fp32 runs.
    cfg.MODEL.DETR.SPEED.ATTENTION_PRECISION = "auto"
    # Training only: keep the frozen backbone stages' output (MODEL.BACKBONE.FREEZE_AT) of every
    # augmented view in memory, so that a view seen again (same image, size and flip) skips them
    # (detr_d2/modeling/feature_cache.py, measured in docs/finetuning.md).
    cfg.MODEL.DETR.SPEED.FEATURE_CACHE = CN()
    # Cache the frozen stages' features per view (needs a bounded set of augmented views: no
    # INPUT.CROP).
    cfg.MODEL.DETR.SPEED.FEATURE_CACHE.ENABLED = False
    # Memory budget in GB (10^9 bytes) per process: training stops at start when the training
    # set's views need more (the estimate is logged), and the cache never grows beyond it.
    cfg.MODEL.DETR.SPEED.FEATURE_CACHE.MAX_MEMORY_GB = 8.0
    # Inference precision: "fp32", "bf16" (CPU with AVX512-BF16/AMX, Ampere+ GPUs), "fp16"
    # (GPU only) or "auto" (GPU: bf16 where native, else fp16; CPU: bf16 where it is native and
    # measures faster than fp32, a ~0.3 s check once per process logged with its ratio, else
    # fp32). bf16/fp16 run the network under torch.autocast; post-processing stays fp32.
    cfg.TEST.PRECISION = "fp32"
    # Fold (frozen) batch norms into the preceding convolutions of an inference copy of the model
    # (exact up to float rounding; the training model keeps its norms).
    cfg.TEST.FOLD_BATCHNORM = True
    # torch.compile the backbone and transformer of the inference copy (each new input size
    # compiles again; measured in docs/benchmarks.md).
    cfg.TEST.COMPILE = False
    # Mixed-precision training (SOLVER.AMP.ENABLED): "fp16" (GPU, with a gradient scaler),
    # "bf16" (CPU or GPU, no scaler needed) or "auto" (as TEST.PRECISION). Matching and losses
    # always run in fp32.
    cfg.SOLVER.AMP.PRECISION = "fp16"

    # Exponential moving average of the weights: evaluated, and saved as the checkpoints' "model"
    # (the raw weights stay in the trainer state for --resume). Decay ramps up from 0 (ema.py).
    cfg.SOLVER.EMA = CN()
    cfg.SOLVER.EMA.ENABLED = False
    cfg.SOLVER.EMA.DECAY = 0.999

    # Learning-rate multiplier of the backbone (official: 1e-5 vs 1e-4 for the transformer).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Learning rate of each part, as a factor of SOLVER.BASE_LR (fine-tuning: e.g. a backbone far
    # below the heads). 0 freezes the part: no gradient, not in the optimizer. BACKBONE -1 takes
    # SOLVER.BACKBONE_MULTIPLIER. Detectron2's MODEL.BACKBONE.FREEZE_AT freezes backbone stages
    # on its own. ENCODER: input projection and transformer encoder; DECODER: transformer
    # decoder; HEADS: class and box heads, object queries (and the mask head); TRAINING_AIDS:
    # the training-only parts (query groups, one-to-many queries, dense head, denoising).
    cfg.SOLVER.LR_FACTORS = CN()
    cfg.SOLVER.LR_FACTORS.BACKBONE = -1.0
    cfg.SOLVER.LR_FACTORS.ENCODER = 1.0
    cfg.SOLVER.LR_FACTORS.DECODER = 1.0
    cfg.SOLVER.LR_FACTORS.HEADS = 1.0
    cfg.SOLVER.LR_FACTORS.TRAINING_AIDS = 1.0
    # Schedule in epochs of the training set, for fine-tuning on datasets of any size. MAX > 0
    # replaces SOLVER.MAX_ITER, STEPS and WARMUP_ITERS at start (tools/train_net.py) by these
    # epoch counts times the training images / IMS_PER_BATCH (logged, kept in config.yaml).
    cfg.SOLVER.EPOCHS = CN()
    cfg.SOLVER.EPOCHS.MAX = 0.0
    cfg.SOLVER.EPOCHS.STEPS = []
    cfg.SOLVER.EPOCHS.WARMUP = 0.0
    # Optimizer: "ADAMW" (official) or "SGD" (Detectron2's default).
    cfg.SOLVER.OPTIMIZER = "ADAMW"

    # COCOeval of box/mask AP: "faster_coco_eval", "pycocotools", "auto" (the first if installed).
    cfg.TEST.COCO_EVAL_BACKEND = "auto"

    # COCO-format datasets to register before training, as [[name, json_file, image_root], ...];
    # name them in DATASETS.TRAIN / DATASETS.TEST. Relative paths are relative to the working dir.
    cfg.DATASETS.REGISTER_COCO = []
    # COCO-panoptic-format datasets to register, as [[name, image_root, panoptic_root,
    # panoptic_json, instances_json], ...]; instances_json ("" = none) enables box/mask AP.
    cfg.DATASETS.REGISTER_COCO_PANOPTIC = []

    # Official crop augmentation: resize the shorter side to one of these, then crop
    # (INPUT.CROP.SIZE, "absolute_range") and resize again to INPUT.MIN_SIZE_TRAIN.
    cfg.INPUT.CROP.PRE_RESIZE = [400, 500, 600]

    _register_old_keys(cfg)


# Keys of earlier releases, grouped since by the object they build: a YAML file or command line
# that still names one fails at merge with yacs' "Key ... was renamed to ..." error, so that no
# setting is silently lost. Kept for one release.
_RENAMED_KEYS = {
    **{
        f"MODEL.DETR.{key}": f"MODEL.DETR.MATCHER.{key}"
        for key in ("COST_CLASS", "COST_BBOX", "COST_GIOU")
    },
    **{
        f"MODEL.DETR.{key}": f"MODEL.DETR.LOSS.{key}"
        for key in (
            "DEEP_SUPERVISION",
            "CLASS_WEIGHT",
            "L1_WEIGHT",
            "GIOU_WEIGHT",
            "NO_OBJECT_WEIGHT",
            "CLASS_LOSS",
            "FOCAL_ALPHA",
            "FOCAL_GAMMA",
            "MASK_WEIGHT",
            "DICE_WEIGHT",
        )
    },
    "MODEL.DETR.GROUPS": "MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS",
    "MODEL.DETR.ONE_TO_MANY": "MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY",
    "MODEL.DETR.DENOISING": "MODEL.DETR.TRAINING_AIDS.DENOISING",
    "MODEL.DETR.DENSE_AUX": "MODEL.DETR.TRAINING_AIDS.DENSE_AUX",
    "MODEL.DETR.FEATURE_CACHE": "MODEL.DETR.SPEED.FEATURE_CACHE",
    "MODEL.DETR.CHANNELS_LAST": "MODEL.DETR.SPEED.MEMORY_FORMAT",
    "MODEL.DETR.ATTENTION_FP32": "MODEL.DETR.SPEED.ATTENTION_PRECISION",
}
# Switches that became the behaviour (their results were the same): ignored with a warning.
# FAST_DROPOUT, BATCH_FIRST_TRAINING: training always runs batch-first with the cheaper dropout
# masks; SIZE_DIVISIBILITY_TRAIN: training batches are always padded to a multiple of 32;
# SOLVER.FUSED_OPTIMIZER: the optimizer always uses PyTorch's fused update where it exists.
_DELETED_KEYS = (
    "MODEL.DETR.FAST_DROPOUT",
    "MODEL.DETR.BATCH_FIRST_TRAINING",
    "MODEL.DETR.SIZE_DIVISIBILITY_TRAIN",
    "SOLVER.FUSED_OPTIMIZER",
)
_VALUE_HINTS = {
    "MODEL.DETR.CHANNELS_LAST": 'values "auto", "channels_last", "contiguous"',
    "MODEL.DETR.ATTENTION_FP32": 'values "auto", "fp32", "autocast"',
}
# the old switches' values in their new keys' terms: on is the explicit choice, off (their
# default, same results) lets the hardware choose
_CONVERT_VALUES = {
    "MODEL.DETR.CHANNELS_LAST": lambda on: "channels_last" if on else "auto",
    "MODEL.DETR.ATTENTION_FP32": lambda on: "fp32" if on else "auto",
}
_FILE_HINT = "a YAML file of an earlier release loads with detr_d2.config.merge_detr_config_file"


def _register_old_keys(cfg: CN) -> None:
    """Register :data:`_RENAMED_KEYS` (a renamed node with each of its keys, so that both YAML
    nesting and ``opts`` lists name the new key) and :data:`_DELETED_KEYS` on ``cfg``."""
    for old, new in _RENAMED_KEYS.items():
        hint = "; ".join(filter(None, (_VALUE_HINTS.get(old), _FILE_HINT)))
        cfg.register_renamed_key(old, new, message=hint)
        node = _lookup(cfg, new)
        if isinstance(node, CN):
            for key in _leaf_keys(node):
                cfg.register_renamed_key(f"{old}.{key}", f"{new}.{key}")
    for old in _DELETED_KEYS:
        cfg.register_deprecated_key(old)


def _lookup(cfg: CN, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _leaf_keys(node: CN, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        if isinstance(value, CN):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def merge_detr_config_file(cfg: CN, path: str) -> list[str]:
    """``cfg.merge_from_file(path)``, also for a file of an earlier release (a ``config.yaml``
    that training wrote, say): keys that moved into a group are moved to their new place first,
    with one warning listing them, as Detectron2 upgrades its own old configs. Returns the moves
    (``"OLD -> NEW"``)."""
    loaded = cfg.load_yaml_with_base(path, allow_unsafe=True)
    moves = _move_old_keys(loaded)
    if not moves or loaded.get("VERSION", cfg.VERSION) != cfg.VERSION:
        cfg.merge_from_file(path)  # nothing moved, or Detectron2's own upgrade is needed first
        return []
    logger.warning(
        f"{path}: keys of an earlier release read at their new place: {', '.join(moves)}."
    )
    cfg.merge_from_other_cfg(type(cfg)(loaded))
    return moves


def _move_old_keys(loaded: dict) -> list[str]:
    moves = []
    for old, new in _RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = loaded
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        value = _CONVERT_VALUES[old](value) if old in _CONVERT_VALUES else value
        *new_parents, new_leaf = new.split(".")
        target = loaded
        for part in new_parents:
            target = target.setdefault(part, {})
        if isinstance(value, dict) and isinstance(target.get(new_leaf), dict):
            target[new_leaf].update(value)
        else:
            target[new_leaf] = value
        moves.append(f"{old} -> {new}")
    return moves
