"""Does a checkpoint fit the model its config builds? Checked on every load, before any prediction
or training step, so that weights of another backbone, dilation, width or layer count never load
half-way and predict without a word.

Two checks, both ending in :class:`CheckpointMismatch`, which names what differs and what to do:

1. The architecture a checkpoint declares (the training ``args`` of official DETR files; the
   ``architecture`` detr_d2 checkpoints store) against the model's: ResNet depth, res5 dilation
   (DC5), transformer width, heads, feed-forward width and layer counts. The number of object
   queries may differ (fine-tuning: ``MODEL.DETR.INIT.QUERIES``).
2. The tensors, after conversion to the model's layout: every checkpoint tensor must be used and
   every model tensor filled, with the same shape, except what is documented to start fresh: the
   class head and object queries when the class layout or query count differ, the training-only
   parts (``train_only.*``), and the mask head when the checkpoint has none (the second panoptic
   stage starts from a detection model). ``MODEL.DETR.INIT.PARTIAL True`` turns both checks into
   warnings, for weights that cover part of the model only (an ImageNet ResNet for the backbone).
"""

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURE_KEYS",
    "CheckpointMismatch",
    "architecture_of_cfg",
    "architecture_of_model",
    "architecture_of_official_args",
    "check_checkpoint_fits",
]

PARTIAL_KEY = "MODEL.DETR.INIT.PARTIAL"
# architecture field -> the config key that sets it
ARCHITECTURE_KEYS = {
    "depth": "MODEL.RESNETS.DEPTH",
    "res5_dilation": "MODEL.RESNETS.RES5_DILATION",
    "hidden_dim": "MODEL.DETR.HIDDEN_DIM",
    "nheads": "MODEL.DETR.NHEADS",
    "dim_feedforward": "MODEL.DETR.DIM_FEEDFORWARD",
    "enc_layers": "MODEL.DETR.ENC_LAYERS",
    "dec_layers": "MODEL.DETR.DEC_LAYERS",
}
# ResNet blocks per stage (res2..res5) -> depth, as Detectron2 and torchvision build them
_DEPTH_OF_BLOCKS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_FRESH_HEADS = ("class_embed.", "query_embed.")  # re-initialised when classes/queries differ
_TRAINING_ONLY = "train_only."  # query groups, one-to-many queries, dense head: start fresh
_MASK_HEAD = ("bbox_attention.", "mask_head.")
_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class CheckpointMismatch(UserInputError):
    """A checkpoint that does not fit the model of the config."""


def architecture_of_model(model: nn.Module) -> dict:
    """The fields of :data:`ARCHITECTURE_KEYS` of a built DETR (absent where it has no such
    part, e.g. a backbone other than a ResNet)."""
    arch = {}
    modules = dict(model.named_modules())
    blocks = tuple(
        len(modules[f"backbone.res{i}"]) for i in range(2, 6) if f"backbone.res{i}" in modules
    )
    if len(blocks) == 4:
        arch["depth"] = _DEPTH_OF_BLOCKS.get(blocks)
        if blocks == (3, 4, 6, 3) and not hasattr(modules["backbone.res2"][0], "conv3"):
            arch["depth"] = 34  # R34 has R50's block counts, of basic (two-conv) blocks
        arch["res5_dilation"] = int(modules["backbone.res5"][-1].conv2.dilation[0])
    transformer = getattr(model, "transformer", None)
    if transformer is not None:
        encoder, decoder = transformer.encoder.layers, transformer.decoder.layers
        layer = decoder[0] if len(decoder) else encoder[0]
        arch.update(
            hidden_dim=int(layer.linear1.in_features),
            nheads=int(layer.self_attn.num_heads),
            dim_feedforward=int(layer.linear1.out_features),
            enc_layers=len(encoder),
            dec_layers=len(decoder),
        )
    return {k: v for k, v in arch.items() if v is not None}


def _as_dict(args) -> Mapping:
    """Official training arguments: an ``argparse.Namespace``, or a dict of one."""
    return args if isinstance(args, Mapping) else vars(args)


def architecture_of_official_args(args) -> dict:
    """The fields of :data:`ARCHITECTURE_KEYS` from an official DETR file's training arguments
    (``argparse.Namespace`` or a dict of it)."""
    args = _as_dict(args)
    arch = {}
    backbone = str(args.get("backbone", ""))
    if backbone.startswith("resnet") and backbone[len("resnet") :].isdigit():
        arch["depth"] = int(backbone[len("resnet") :])
    if "dilation" in args:
        arch["res5_dilation"] = 2 if args["dilation"] else 1
    for field in ("hidden_dim", "nheads", "dim_feedforward", "enc_layers", "dec_layers"):
        if field in args:
            arch[field] = int(args[field])
    return arch


def architecture_of_cfg(cfg) -> dict:
    """The fields of :data:`ARCHITECTURE_KEYS` a config builds."""
    arch = {}
    for field, key in ARCHITECTURE_KEYS.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        arch[field] = int(node)
    return arch


@lru_cache(maxsize=1)
def _bundled_architectures() -> tuple[tuple[str, tuple, bool], ...]:
    """(config path, architecture items, panoptic) of the bundled official-model configs."""
    from detectron2.config import get_cfg

    from .config import add_detr_config

    found = []
    for path in sorted(_CONFIGS.glob("detr_r*.yaml")):
        cfg = get_cfg()
        add_detr_config(cfg)
        try:
            cfg.merge_from_file(str(path))
        except Exception:  # a config that needs more than the defaults: not a suggestion
            continue
        found.append(
            (f"configs/{path.name}", tuple(architecture_of_cfg(cfg).items()), cfg.MODEL.MASK_ON)
        )
    return tuple(found)


def fitting_config(arch: dict, masks: bool) -> str | None:
    """A bundled config that builds ``arch`` (a panoptic one first when ``masks``)."""
    matches = [
        (panoptic != masks, path)
        for path, items, panoptic in _bundled_architectures()
        if all(dict(items).get(k) == v for k, v in arch.items())
    ]
    return min(matches)[1] if matches else None


def _check_architecture(model_arch: dict, declared: dict) -> list[str]:
    """One line per field that differs between the model and a checkpoint's declaration."""
    return [
        f"{field} {declared[field]} in the checkpoint, {model_arch[field]} in the config "
        f"({ARCHITECTURE_KEYS[field]})"
        for field in ARCHITECTURE_KEYS
        if field in declared and field in model_arch and declared[field] != model_arch[field]
    ]


def _grouped(keys: Iterable[str], limit: int = 6) -> str:
    """Keys summarised by module (``backbone.res4.6``: 10 tensors), at most ``limit`` groups."""
    groups = defaultdict(int)
    for key in keys:
        parts = key.split(".")
        groups[".".join(parts[: min(3, len(parts) - 1)]) or key] += 1
    names = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    more = f", ... {len(names) - limit} more modules" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _tensor_differences(state_dict: Mapping, own: Mapping) -> list[str]:
    """Lines naming the missing, unused and mis-shaped tensors beyond the documented fresh ones."""
    has_mask_head = any(k.startswith(_MASK_HEAD) for k in state_dict)

    def fresh(key: str) -> bool:
        return (
            key.startswith((_TRAINING_ONLY, *_FRESH_HEADS))
            or key.endswith(
                "num_batches_tracked"  # a batch-norm counter: files of frozen batch norms lack it
            )
            or (key.startswith(_MASK_HEAD) and not has_mask_head)
        )

    missing = [k for k in own if k not in state_dict and not fresh(k)]
    # unused: a mask head the model does not build is not an error (boxes of a panoptic model)
    unused = [
        k for k in state_dict if k not in own and not k.startswith((_TRAINING_ONLY, *_MASK_HEAD))
    ]
    shaped = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in state_dict
        if k in own
        and not k.startswith((_TRAINING_ONLY, *_FRESH_HEADS))
        and isinstance(state_dict[k], torch.Tensor)
        and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    lines = []
    if missing:
        lines.append(f"{len(missing)} model tensors not in the checkpoint: {_grouped(missing)}")
    if unused:
        lines.append(
            f"{len(unused)} checkpoint tensors the model has no place for: {_grouped(unused)}"
        )
    if shaped:
        more = f", ... {len(shaped) - 4} more" if len(shaped) > 4 else ""
        lines.append(
            f"{len(shaped)} tensors of another shape (checkpoint vs model): {'; '.join(shaped[:4])}{more}"
        )
    return lines


def check_checkpoint_fits(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    official_args=None,
    architecture: dict | None = None,
    matching_heuristics: bool = False,
    partial: bool = False,
) -> None:
    """Raise :class:`CheckpointMismatch` when ``state_dict`` (in the model's layout) or the
    architecture its file declares does not fit ``model``; with ``partial``, log it instead.

    Args:
        official_args: the ``args`` of an official DETR file, if it has them.
        architecture: the ``architecture`` a detr_d2 checkpoint stores, if it has one.
        matching_heuristics: a file whose names Detectron2 matches by heuristics (Caffe2 /
            model-zoo ``.pkl``, e.g. an ImageNet ResNet): it cannot hold a whole DETR.
    """
    model_arch = architecture_of_model(model)
    masks = any(k.startswith(_MASK_HEAD) for k in state_dict)
    declared = {}
    if official_args is not None:
        declared = architecture_of_official_args(official_args)
        masks = masks or bool(_as_dict(official_args).get("masks"))
    elif architecture:
        declared = dict(architecture)
    problems = _check_architecture(model_arch, declared)
    if matching_heuristics:
        problems.append(
            "its tensor names are matched by heuristics (a Detectron2/Caffe2 model-zoo .pkl such "
            "as an ImageNet ResNet): it holds a backbone at most"
        )
    else:
        problems += _tensor_differences(state_dict, model.state_dict())
    if not problems:
        return
    if partial:
        logger.warning(
            f"Partial load ({PARTIAL_KEY} True): " + "; ".join(problems) + ". What is not in the "
            "checkpoint keeps its fresh initialisation."
        )
        return
    advice = []
    if declared and any(declared.get(f) != model_arch.get(f) for f in declared if f in model_arch):
        fit = fitting_config({**model_arch, **declared}, masks)
        advice.append(
            f"the config that fits this checkpoint: {fit}"
            if fit
            else "set the keys named above to the checkpoint's values"
        )
    advice.append(f"to load only the tensors that fit, set {PARTIAL_KEY} True")
    advice = "; ".join(advice)
    raise CheckpointMismatch(
        f"The checkpoint does not fit the model of this config: {'; '.join(problems)}. "
        f"{advice[0].upper()}{advice[1:]}."
    )
