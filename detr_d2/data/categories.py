"""Which categories of a COCO json become the model's classes, checked against
``MODEL.DETR.NUM_CLASSES`` before training starts.

DETR's class K is "no object", so a label >= K is not an error the losses would catch: it trains
the class as background. Labelling tools (e.g. Roboflow) export an unused "superclass" category
beside the real ones (``[{id 0, "faces"}, {id 1, "face"}]``); with ``NUM_CLASSES 1`` the face
would be label 1. So: categories no annotation uses may be dropped (logged), and a count that
fits neither all categories nor the used ones stops at start with what to set.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["CategorySummary", "check_labels_fit", "choose_categories", "read_categories"]


@dataclass
class CategorySummary:
    """The categories of one COCO json (``id -> name``) and how many annotations use each."""

    where: str  # e.g. "'faces_train' (data/train.json)"
    names: dict[int, str]
    used: dict[int, int] = field(default_factory=dict)

    def describe(self, ids: Sequence[int]) -> str:
        shown = ", ".join(f"{i} {self.names.get(i, '?')!r}" for i in list(ids)[:8])
        return shown + (", ..." if len(ids) > 8 else "")


def read_categories(json_file: str, where: str) -> CategorySummary:
    """The categories and their annotation counts (malformed files fail later, in the loader,
    with the file and the id named; here only what is readable is counted)."""
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return CategorySummary(where, {})
    if not isinstance(data, dict):
        return CategorySummary(where, {})
    names = {
        c["id"]: str(c.get("name"))
        for c in data.get("categories") or []
        if isinstance(c, dict) and isinstance(c.get("id"), int)
    }
    used: dict[int, int] = {}
    for ann in data.get("annotations") or []:
        category = ann.get("category_id") if isinstance(ann, dict) else None
        if category in names:
            used[category] = used.get(category, 0) + 1
    return CategorySummary(where, names, used)


def choose_categories(summary: CategorySummary, num_classes: int) -> list[int]:
    """The category ids that become classes 0..K-1 (sorted), for ``NUM_CLASSES`` = K.

    K == all categories: all. K == the used ones (fewer): those, the unused dropped with a log
    line. K == 0: the used ones (all of them if none is used). Otherwise ``ValueError`` saying
    what the data has and what to set. More classes than categories only warns.
    """
    all_ids, used_ids = sorted(summary.names), sorted(summary.used)
    unused = [i for i in all_ids if i not in summary.used]
    if num_classes == 0:
        chosen = used_ids if used_ids else all_ids
        logger.info(
            f"MODEL.DETR.NUM_CLASSES 0: {len(chosen)} class(es) from the training set "
            f"{summary.where}: {summary.describe(chosen)}."
        )
    elif num_classes == len(all_ids):
        chosen = all_ids
    elif num_classes == len(used_ids) and unused:
        chosen = used_ids
    elif num_classes > len(all_ids):
        logger.warning(
            f"MODEL.DETR.NUM_CLASSES={num_classes} but {summary.where} has only {len(all_ids)} "
            f"categories: classes {len(all_ids)}..{num_classes - 1} never get a label."
        )
        return all_ids
    else:
        raise ValueError(
            f"MODEL.DETR.NUM_CLASSES={num_classes} does not fit the dataset {summary.where}: it "
            f"has {len(all_ids)} categories ({summary.describe(all_ids)}), of which annotations "
            f"use {len(used_ids)} ({summary.describe(used_ids)}). Labels >= NUM_CLASSES would "
            f"be trained as 'no object'. Set MODEL.DETR.NUM_CLASSES {len(all_ids)} (every "
            f"category)"
            + (f", {len(used_ids)} (the used ones)" if unused else "")
            + " or 0 (taken from the training set)."
        )
    dropped = [i for i in all_ids if i not in chosen]
    if dropped:
        logger.info(
            f"{summary.where}: dropped {len(dropped)} category(ies) that no annotation uses: "
            f"{summary.describe(dropped)}; classes: {summary.describe(chosen)}."
        )
    return chosen


def check_labels_fit(
    dataset_dicts: Sequence[dict],
    num_classes: int,
    dataset_names: str,
    names: Sequence[str] | None = None,
) -> None:
    """Fail before training when any annotation's contiguous label is outside 0..K-1 (it would
    reach the matcher and the losses as the "no object" class or beyond)."""
    bad = next(
        (
            (record.get("image_id"), ann["category_id"])
            for record in dataset_dicts
            for ann in record.get("annotations", ())
            if not 0 <= ann["category_id"] < num_classes
        ),
        None,
    )
    if bad is not None:
        image_id, label = bad
        raise ValueError(
            f"Training set {dataset_names}: image {image_id} has an annotation of class {label}, "
            f"but MODEL.DETR.NUM_CLASSES={num_classes} (labels must be 0..{num_classes - 1}; "
            f"{num_classes} is 'no object'). Set MODEL.DETR.NUM_CLASSES to the dataset's class "
            f"count{f' ({len(names)})' if names else ''}, or 0 to take it from the training set."
        )
