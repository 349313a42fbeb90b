"""Starting a model from a checkpoint of other classes or another query count (fine-tuning).

Why: a class row or object query that starts from random values has to be learned again from
the new data, which costs most of a short fine-tuning run. A face detector fine-tuned from COCO
converges faster when its ``face`` row starts from COCO's ``person`` row and its queries are
pretrained ones (D-FINE and RF-DETR do the same). ``MODEL.DETR.INIT`` says how
(:class:`CheckpointInit`); :func:`adapt_heads` applies it to a checkpoint's state dict before it
is loaded, on every loading path (``MODEL.WEIGHTS``, ``DefaultPredictor``,
``DetectionCheckpointer``, ``load_state_dict``). A checkpoint that already has the model's
classes and queries (resuming, predicting with the fine-tuned model) loads as it is.
"""

import logging
from dataclasses import dataclass

import torch
from detectron2.config import CfgNode

from .checkpoint import (
    convert_official_for_model,
    is_official_detr_state_dict,
    torchvision_resnet_as_official,
)
from .checkpoint_fit import check_checkpoint_fits
from .layout import (
    ClassLayout,
    official_class_rows,
    official_coco_layout,
)

__all__ = [
    "CheckpointInit",
    "adapt_heads",
    "checkpoint_class_layout",
    "convert_official_in_place",
    "fit_state_dict",
    "query_subset",
]

logger = logging.getLogger(__name__)

QUERY_POLICIES = ("first", "spread", "random")
_CLASSES_KEY = "MODEL.DETR.INIT.CLASSES_FROM"
_QUERIES_KEY = "MODEL.DETR.INIT.QUERIES"


@dataclass(frozen=True)
class CheckpointInit:
    """``classes_from[i]``: the checkpoint class whose row model class i starts from ("": a
    fresh row; empty tuple: COCO categories of an official head take their own row, the others
    start fresh). ``queries``: which of the checkpoint's object queries a model with fewer keeps
    ("first", "spread") or "random" for none."""

    classes_from: tuple[str, ...] = ()
    queries: str = "first"
    partial: bool = False  # load a checkpoint that covers part of the model only

    @classmethod
    def from_config(cls, cfg: CfgNode, num_classes: int) -> "CheckpointInit":
        init = cfg.MODEL.DETR.INIT
        classes_from = tuple(str(name) for name in init.CLASSES_FROM)
        if classes_from and len(classes_from) != num_classes:
            raise ValueError(
                f"{_CLASSES_KEY}={list(classes_from)} has {len(classes_from)} entries for a "
                f"model of {num_classes} classes: give one checkpoint class name per class, in "
                'the model\'s class order ("" for a class that starts from a fresh row).'
            )
        if init.QUERIES not in QUERY_POLICIES:
            raise ValueError(
                f"{_QUERIES_KEY} must be one of {QUERY_POLICIES}, got {init.QUERIES!r}."
            )
        return cls(classes_from, init.QUERIES, bool(init.PARTIAL))


def checkpoint_class_layout(
    state_dict: dict[str, torch.Tensor], stored: dict | None
) -> ClassLayout | None:
    """The class layout of a checkpoint: the one a detr_d2 checkpoint stores, else the official
    layout its class-head size implies (92 or 251 rows: id-indexed COCO; 81 or 134: Detectron2's
    contiguous COCO classes), else ``None``."""
    if stored:
        return ClassLayout.from_dict(stored)
    head = state_dict.get("class_embed.weight")
    if head is None or head.shape[0] - 1 not in (80, 91, 133, 250):
        return None
    return official_coco_layout(head.shape[0] - 1)


def adapt_heads(
    state_dict: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    layout: ClassLayout,
    init: CheckpointInit,
    checkpoint_layout: ClassLayout | None,
) -> None:
    """Fit the class head and object queries of ``state_dict`` (in the model's key names) to a
    model whose state dict is ``own`` and whose classes are ``layout``, in place, as ``init``
    says. What cannot be fitted is dropped, so the model keeps its fresh values (logged)."""
    _adapt_class_head(state_dict, own, layout, init, checkpoint_layout)
    _adapt_queries(state_dict, own, init.queries)


def fit_state_dict(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    class_layout: dict | None = None,
    **declared,
) -> dict[str, torch.Tensor]:
    """``state_dict`` in the layout of ``model`` (a ``Detr``): an official DETR one (torchvision
    backbone names, optional ``detr.`` prefix, class head indexed by COCO category id) is
    converted, and so is a torchvision ImageNet ResNet (as the backbone of one); the class head
    and queries of a checkpoint of other classes or another query count (``class_layout``: the
    names a detr_d2 checkpoint stores) are fitted to the model as its ``checkpoint_init``
    (``MODEL.DETR.INIT``) says. The result must fit the model (``declared``: what the file says
    it holds; :func:`detr_d2.checkpoint_fit.check_checkpoint_fits`)."""
    state_dict = torchvision_resnet_as_official(state_dict)
    if is_official_detr_state_dict(state_dict):
        logger.warning("Loading an official DETR state dict: converting it to detr_d2's layout.")
        state_dict = convert_official_for_model(
            state_dict, model, model.class_layout, model.checkpoint_init
        )
    else:
        state_dict = dict(state_dict)
        stored = checkpoint_class_layout(state_dict, class_layout)
        own = model.state_dict()
        adapt_heads(state_dict, own, model.class_layout, model.checkpoint_init, stored)
    partial = model.checkpoint_init.partial
    check_checkpoint_fits(model, state_dict, partial=partial, **declared)
    return state_dict


def convert_official_in_place(model: torch.nn.Module, state_dict: dict, prefix: str) -> None:
    """``model._load_from_state_dict``'s conversion, so that plain ``load_state_dict`` converts
    too: an official DETR state dict under ``prefix`` is replaced, in place, by
    :func:`fit_state_dict`'s result; any other is left as it is."""
    local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not is_official_detr_state_dict(local):
        return
    converted = fit_state_dict(model, local)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    state_dict.update({prefix + k: v for k, v in converted.items()})


def _same_classes(layout: ClassLayout, rows: int, checkpoint_layout: ClassLayout | None) -> bool:
    if rows != layout.num_classes + 1:
        return False
    return checkpoint_layout is None or checkpoint_layout.names == layout.names


def _adapt_class_head(state_dict, own, layout, init, checkpoint_layout) -> None:
    keys = ("class_embed.weight", "class_embed.bias")
    if not all(k in state_dict and k in own for k in keys):
        return
    rows = state_dict[keys[0]].shape[0]
    if _same_classes(layout, rows, checkpoint_layout):
        return
    if init.classes_from:
        source = _seed_rows(init.classes_from, checkpoint_layout, rows)
        for key in keys:
            fresh = own[key].detach().clone().to(state_dict[key].dtype)
            for i, row in enumerate(source):
                if row is not None:
                    fresh[i] = state_dict[key][row]
            fresh[-1] = state_dict[key][-1]  # the checkpoint's "no object" row
            state_dict[key] = fresh
        seeded = [f"{layout.names[i]} <- {n}" for i, n in enumerate(init.classes_from) if n]
        logger.info(
            f"Class head seeded from the checkpoint's rows ({_CLASSES_KEY}): "
            f"{', '.join(seeded) or 'none'}; the 'no object' row kept"
            + (f"; {source.count(None)} classes start fresh." if None in source else ".")
        )
        return
    coco_rows = official_class_rows(layout, rows)  # None unless an official head fits
    if coco_rows is not None:
        index = torch.as_tensor(list(coco_rows) + [rows - 1])
        for key in keys:
            state_dict[key] = state_dict[key][index].clone()
        logger.info(f"Class head: the checkpoint's rows of the model's COCO classes ({rows} rows).")
        return
    if rows != own[keys[0]].shape[0]:
        for key in keys:
            del state_dict[key]
        logger.info(
            f"Re-initialised class_embed: the checkpoint has {rows - 1} classes, the model "
            f"{layout.num_classes} (MODEL.DETR.NUM_CLASSES; {_CLASSES_KEY} seeds them from "
            "classes of the checkpoint)."
        )


def _seed_rows(
    classes_from: tuple[str, ...], checkpoint_layout: ClassLayout | None, rows: int
) -> list[int | None]:
    """The checkpoint row of each named class (``None`` for "")."""
    if checkpoint_layout is None or checkpoint_layout.num_classes != rows - 1:
        raise ValueError(
            f"{_CLASSES_KEY}={list(classes_from)}: the checkpoint's class head has {rows} rows "
            "and the checkpoint stores no class names (neither a detr_d2 checkpoint nor an "
            "official COCO head), so its classes cannot be found by name."
        )
    index = {}
    for row, name in enumerate(checkpoint_layout.names):
        index.setdefault(name, row)
    unknown = [n for n in classes_from if n and n not in index]
    if unknown:
        known = [n for n in index if n != "N/A"]
        raise ValueError(
            f"{_CLASSES_KEY}: the checkpoint has no class {', '.join(map(repr, unknown))}. Its "
            f"{len(known)} classes ({checkpoint_layout.source}): {', '.join(known)}."
        )
    return [index[n] if n else None for n in classes_from]


def query_subset(queries: torch.Tensor, count: int, policy: str) -> torch.Tensor:
    """Indices of the ``count`` queries (rows of ``queries``) to keep. "first": the first ones;
    "spread": greedy farthest-point selection, starting from query 0, so the kept queries are
    as different from each other as the pretrained set allows (a query's embedding decides
    which image regions and box sizes it looks for)."""
    if policy == "first":
        return torch.arange(count)
    chosen = [0]
    distance = torch.cdist(queries.float(), queries[:1].float()).squeeze(1)
    for _ in range(count - 1):
        distance[chosen] = -1.0
        nxt = int(distance.argmax())
        chosen.append(nxt)
        distance = torch.minimum(
            distance, torch.cdist(queries.float(), queries[nxt : nxt + 1].float()).squeeze(1)
        )
    return torch.as_tensor(sorted(chosen))


def _adapt_queries(state_dict, own, policy: str) -> None:
    key = "query_embed.weight"
    if key not in state_dict or key not in own:
        return
    pretrained, fresh = state_dict[key], own[key].detach().clone().to(state_dict[key].dtype)
    have, want = pretrained.shape[0], fresh.shape[0]
    if have == want or pretrained.shape[1:] != fresh.shape[1:]:
        return  # a width mismatch is left to the checkpointer's shape check
    if policy == "random":
        del state_dict[key]
        logger.info(
            f"Re-initialised query_embed: the checkpoint has {have} queries, the model {want} "
            f"(MODEL.DETR.NUM_OBJECT_QUERIES; {_QUERIES_KEY} 'random')."
        )
        return
    if want < have:
        kept = query_subset(pretrained, want, policy)
        fresh = pretrained[kept].clone()
        logger.info(
            f"Kept {want} of the checkpoint's {have} object queries ({_QUERIES_KEY} "
            f"{policy!r}): {kept.tolist()}."
        )
    else:
        fresh[:have] = pretrained
        logger.info(
            f"Kept the checkpoint's {have} object queries; {want - have} more start fresh "
            "(MODEL.DETR.NUM_OBJECT_QUERIES)."
        )
    state_dict[key] = fresh
